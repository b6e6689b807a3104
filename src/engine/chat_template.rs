//! Chat templates: the model's own Jinja template (GGUF `tokenizer.chat_template` or
//! `tokenizer_config.json`'s `chat_template`) rendered with minijinja, with the Python
//! string methods Hugging Face templates call (`.strip()`, `.startswith()`, …).

use minijinja::{Environment, ErrorKind};
use serde::Serialize;

use super::EngineError;

/// One message of a chat, as the template sees it. The tool fields are left out when empty,
/// so that templates testing `message.tool_calls is defined` see what they expect.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// An assistant's calls, as OpenAI sends them (`{"id", "type", "function": {"name",
    /// "arguments"}}`), with the arguments as a JSON object, which is what templates print.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<serde_json::Value>,
    /// A `tool` message's answer to this call.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            ..Self::default()
        }
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    reasoning_tags: bool,
    source: String,
}

impl ChatTemplate {
    /// Compiles `source`; a syntax error is reported at load time, not at the first request.
    pub fn new(
        source: &str,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self, EngineError> {
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| {
                EngineError::ChatTemplate(format!(
                    "the model's chat template does not compile: {e}"
                ))
            })?;
        Ok(Self {
            env,
            bos_token: bos_token.unwrap_or_default(),
            eos_token: eos_token.unwrap_or_default(),
            reasoning_tags: source.contains("<think>") || source.contains("</think>"),
            source: source.to_string(),
        })
    }

    /// The template's Jinja source (what tool-call format it teaches, whether it renders
    /// tools).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether the template knows `<think>…</think>`: the model's reasoning is then split off
    /// its answer.
    pub fn uses_reasoning_tags(&self) -> bool {
        self.reasoning_tags
    }

    /// The prompt text for `messages`, ending with the assistant's turn opened.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String, EngineError> {
        self.render_with(messages, &serde_json::Map::new())
    }

    /// As [`Self::render`], with a request's `chat_template_kwargs` (e.g. `enable_thinking`)
    /// in the template's context; they cannot replace the messages or the special tokens.
    pub fn render_with(
        &self,
        messages: &[ChatMessage],
        kwargs: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String, EngineError> {
        let tmpl = self.env.get_template("chat").expect("added in new");
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
            ..minijinja::Value::from_serialize(kwargs)
        })
        .map_err(|e| {
            // A template's raise_exception is the model telling the user what it accepts
            // (e.g. "roles must alternate"): pass its message on.
            let detail = e
                .detail()
                .map(str::to_string)
                .unwrap_or_else(|| e.to_string());
            EngineError::ChatTemplate(detail)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage::new(role, content)
    }

    #[test]
    fn smollm2_template_adds_default_system_prompt_and_generation_prompt() {
        let t = ChatTemplate::new(SMOLLM2, None, None).unwrap();
        let out = t.render(&[msg("user", "Hi")]).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let out = t
            .render(&[msg("system", "Be brief."), msg("user", "Hi")])
            .unwrap();
        assert!(out.starts_with("<|im_start|>system\nBe brief.<|im_end|>\n"));
    }

    #[test]
    fn python_string_methods_and_raise_exception_work() {
        let t = ChatTemplate::new(
            "{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tools here') }}{% endif %}{{ m.content.strip() }}{% endfor %}",
            None,
            None,
        )
        .unwrap();
        assert_eq!(t.render(&[msg("user", "  x  ")]).unwrap(), "x");
        let err = t.render(&[msg("tool", "x")]).unwrap_err().to_string();
        assert!(err.contains("no tools here"), "{err}");
    }

    #[test]
    fn a_broken_template_is_refused_at_load() {
        assert!(ChatTemplate::new("{% for %}", None, None).is_err());
    }
}
