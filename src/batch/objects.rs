//! The File and Batch objects as OpenAI's API returns them, so that the official clients
//! read ours unchanged.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

/// An uploaded file (`purpose: batch`), or a batch's output or error file
/// (`purpose: batch_output`).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct FileObject {
    pub id: String,
    /// Always `file`.
    pub object: &'static str,
    pub bytes: u64,
    pub created_at: u64,
    pub filename: String,
    pub purpose: String,
    /// Always `processed`: a file is checked before it is accepted.
    pub status: &'static str,
    pub expires_at: Option<u64>,
}

impl FileObject {
    pub fn new(id: String, bytes: u64, created_at: u64, filename: &str, purpose: &str) -> Self {
        Self {
            id,
            object: "file",
            bytes,
            created_at,
            filename: filename.into(),
            purpose: purpose.into(),
            status: "processed",
            expires_at: None,
        }
    }
}

/// A batch's place in OpenAI's lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BatchStatus {
    Validating,
    Failed,
    InProgress,
    Finalizing,
    Completed,
    Expired,
    Cancelling,
    Cancelled,
}

impl BatchStatus {
    const ALL: [BatchStatus; 8] = [
        BatchStatus::Validating,
        BatchStatus::Failed,
        BatchStatus::InProgress,
        BatchStatus::Finalizing,
        BatchStatus::Completed,
        BatchStatus::Expired,
        BatchStatus::Cancelling,
        BatchStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BatchStatus::Validating => "validating",
            BatchStatus::Failed => "failed",
            BatchStatus::InProgress => "in_progress",
            BatchStatus::Finalizing => "finalizing",
            BatchStatus::Completed => "completed",
            BatchStatus::Expired => "expired",
            BatchStatus::Cancelling => "cancelling",
            BatchStatus::Cancelled => "cancelled",
        }
    }

    /// As stored; an unknown word (a newer version's) reads as failed.
    pub fn parse(s: &str) -> Self {
        Self::ALL
            .into_iter()
            .find(|x| x.as_str() == s)
            .unwrap_or(BatchStatus::Failed)
    }

    /// The column that records when the batch entered this status.
    pub fn time_column(self) -> &'static str {
        match self {
            BatchStatus::Validating => "created_at",
            BatchStatus::Failed => "failed_at",
            BatchStatus::InProgress => "in_progress_at",
            BatchStatus::Finalizing => "finalizing_at",
            BatchStatus::Completed => "completed_at",
            BatchStatus::Expired => "expired_at",
            BatchStatus::Cancelling => "cancelling_at",
            BatchStatus::Cancelled => "cancelled_at",
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct RequestCounts {
    pub total: u64,
    pub completed: u64,
    pub failed: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LineError {
    pub code: String,
    pub message: String,
    pub param: Option<String>,
    pub line: Option<u64>,
}

/// Why a batch failed as a whole.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BatchErrors {
    /// Always `list`.
    #[serde(skip_deserializing, default = "list")]
    pub object: &'static str,
    pub data: Vec<LineError>,
}

fn list() -> &'static str {
    "list"
}

#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct InputTokensDetails {
    pub cached_tokens: u64,
}

#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct OutputTokensDetails {
    pub reasoning_tokens: u64,
}

/// Tokens of the batch's requests so far.
#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct BatchUsage {
    pub input_tokens: u64,
    pub input_tokens_details: InputTokensDetails,
    pub output_tokens: u64,
    pub output_tokens_details: OutputTokensDetails,
    pub total_tokens: u64,
}

impl BatchUsage {
    pub fn new(input: u64, output: u64, cached: u64) -> Self {
        Self {
            input_tokens: input,
            input_tokens_details: InputTokensDetails {
                cached_tokens: cached,
            },
            output_tokens: output,
            output_tokens_details: OutputTokensDetails::default(),
            total_tokens: input + output,
        }
    }
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct BatchObject {
    pub id: String,
    /// Always `batch`.
    pub object: &'static str,
    pub endpoint: String,
    pub errors: Option<BatchErrors>,
    pub input_file_id: String,
    pub completion_window: String,
    pub status: BatchStatus,
    pub output_file_id: Option<String>,
    pub error_file_id: Option<String>,
    pub created_at: u64,
    pub in_progress_at: Option<u64>,
    pub expires_at: u64,
    pub finalizing_at: Option<u64>,
    pub completed_at: Option<u64>,
    pub failed_at: Option<u64>,
    pub expired_at: Option<u64>,
    pub cancelling_at: Option<u64>,
    pub cancelled_at: Option<u64>,
    pub request_counts: RequestCounts,
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Value>,
    pub usage: BatchUsage,
}
