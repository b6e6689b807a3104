//! The model's reasoning kept apart from its answer. For chat templates with `<think>…</think>`
//! the text inside the tags goes to the message's `reasoning_content` and `reasoning` (clients
//! read one or the other), the rest to `content`; in streams too, piece by piece, holding back
//! only what could still be the start of a tag.

const OPEN: &str = "<think>";
const CLOSE: &str = "</think>";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Nothing but whitespace yet: the output may still open with `<think>`.
    Undecided,
    Reasoning,
    /// Just past `</think>`: the whitespace before the answer is dropped.
    AfterReasoning,
    Content,
}

/// How many bytes at the end of `text` could be the start of `tag` (an ASCII tag, so the text
/// before them ends on a character boundary). Streams hold those back until they know.
pub(crate) fn partial_tag_len(text: &str, tag: &str) -> usize {
    (1..tag.len())
        .rev()
        .find(|&k| text.ends_with(&tag[..k]))
        .unwrap_or(0)
}

/// Where an output starts, from the rendered prompt: templates that open the assistant's
/// turn with `<think>` (Qwen3, DeepSeek-R1) make the model start inside its reasoning.
pub fn starts_inside(prompt: &str) -> bool {
    prompt.trim_end().ends_with(OPEN)
}

/// Splits one choice's output, as it arrives, into reasoning and content.
#[derive(Debug, Clone)]
pub struct ReasoningSplitter {
    state: State,
    held: String,
}

impl ReasoningSplitter {
    pub fn new(inside: bool) -> Self {
        Self {
            state: if inside {
                State::Reasoning
            } else {
                State::Undecided
            },
            held: String::new(),
        }
    }

    /// The next piece of output as (reasoning, content); either may be empty.
    pub fn push(&mut self, text: &str) -> (String, String) {
        self.held.push_str(text);
        let (mut reasoning, mut content) = (String::new(), String::new());
        loop {
            match self.state {
                State::Undecided => {
                    let t = self.held.trim_start();
                    if let Some(rest) = t.strip_prefix(OPEN) {
                        self.held = rest.to_string();
                        self.state = State::Reasoning;
                    } else if OPEN.starts_with(t) {
                        return (reasoning, content); // empty, or a prefix of the tag: wait
                    } else {
                        self.state = State::Content;
                    }
                }
                State::Reasoning => match self.held.find(CLOSE) {
                    Some(i) => {
                        reasoning.push_str(&self.held[..i]);
                        self.held.drain(..i + CLOSE.len());
                        self.state = State::AfterReasoning;
                    }
                    None => {
                        // Keep back what could be the start of `</think>`.
                        let cut = self.held.len() - partial_tag_len(&self.held, CLOSE);
                        reasoning.push_str(&self.held[..cut]);
                        self.held.drain(..cut);
                        return (reasoning, content);
                    }
                },
                State::AfterReasoning => {
                    let t = self.held.trim_start();
                    if t.is_empty() {
                        self.held.clear();
                        return (reasoning, content);
                    }
                    self.held = t.to_string();
                    self.state = State::Content;
                }
                State::Content => {
                    content.push_str(&self.held);
                    self.held.clear();
                    return (reasoning, content);
                }
            }
        }
    }

    /// What is still held when the output ends: an unfinished reasoning stays reasoning.
    pub fn finish(&mut self) -> (String, String) {
        let held = std::mem::take(&mut self.held);
        match self.state {
            State::Reasoning => (held, String::new()),
            State::AfterReasoning => (String::new(), String::new()),
            State::Undecided | State::Content => (String::new(), held),
        }
    }

    /// Splits a whole output at once.
    pub fn split_all(inside: bool, text: &str) -> (String, String) {
        let mut s = Self::new(inside);
        let (mut r, mut c) = s.push(text);
        let (r2, c2) = s.finish();
        r.push_str(&r2);
        c.push_str(&c2);
        (r, c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every way of cutting `text` into two or three pieces splits like the whole.
    fn streamed_equals_whole(inside: bool, text: &str) {
        let whole = ReasoningSplitter::split_all(inside, text);
        let cuts: Vec<usize> = (0..=text.len())
            .filter(|&i| text.is_char_boundary(i))
            .collect();
        for &a in &cuts {
            for &b in cuts.iter().filter(|&&b| b >= a) {
                let mut s = ReasoningSplitter::new(inside);
                let (mut r, mut c) = (String::new(), String::new());
                for piece in [&text[..a], &text[a..b], &text[b..]] {
                    let (r1, c1) = s.push(piece);
                    r += &r1;
                    c += &c1;
                }
                let (r1, c1) = s.finish();
                r += &r1;
                c += &c1;
                assert_eq!((r, c), whole, "cut at {a}, {b} of {text:?}");
            }
        }
    }

    #[test]
    fn reasoning_and_content_are_split_whole_and_streamed() {
        let cases = [
            (
                false,
                "<think>2+2 is 4.</think>\n\nThe answer is 4.",
                "2+2 is 4.",
                "The answer is 4.",
            ),
            (false, "  \n<think>hm</think>Yes.", "hm", "Yes."),
            (false, "No tags at all.", "", "No tags at all."),
            (
                false,
                "A <think> in the middle stays content.",
                "",
                "A <think> in the middle stays content.",
            ),
            (
                true,
                "already inside</think>\nDone.",
                "already inside",
                "Done.",
            ),
            (
                true,
                "cut off while thinking </thi",
                "cut off while thinking </thi",
                "",
            ),
            (
                false,
                "<think>ünï 漢字 < </ </think>x",
                "ünï 漢字 < </ ",
                "x",
            ),
            (false, "", "", ""),
            (false, "<thi", "", "<thi"),
        ];
        for (inside, text, reasoning, content) in cases {
            assert_eq!(
                ReasoningSplitter::split_all(inside, text),
                (reasoning.to_string(), content.to_string()),
                "{text:?}"
            );
            streamed_equals_whole(inside, text);
        }
    }

    #[test]
    fn the_prompt_says_whether_the_output_starts_inside() {
        assert!(starts_inside("<|im_start|>assistant\n<think>\n"));
        assert!(!starts_inside(
            "<|im_start|>assistant\n<think>\n\n</think>\n\n"
        ));
        assert!(!starts_inside("<|im_start|>assistant\n"));
    }
}
