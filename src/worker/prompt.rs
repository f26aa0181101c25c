//! What a request becomes before it is decoded: its prompt in the model's chat template, and the
//! sampler that picks its tokens.

use llama_cpp_2::model::{LlamaChatMessage, LlamaModel};
use llama_cpp_2::sampling::LlamaSampler;

use crate::error::Error;
use crate::protocol::GenerateRequest;

/// Refuses what this worker cannot honour yet, so that no control is silently ignored.
pub(super) fn unsupported(request: &GenerateRequest) -> Result<(), Error> {
    let p = &request.params;
    let missing = if !request.messages.is_empty() {
        Some("`messages`")
    } else if request.raw {
        Some("`raw`")
    } else if !p.stop.is_empty() {
        Some("`stop`")
    } else if !p.format.is_text() {
        Some("`format`")
    } else {
        None
    };
    match missing {
        Some(field) => Err(Error::invalid(format!(
            "this worker does not support {field} yet"
        ))),
        None => Ok(()),
    }
}

/// The prompt as the model expects it: its own chat template when it has one.
pub(super) fn render_prompt(
    model: &LlamaModel,
    request: &GenerateRequest,
) -> Result<String, Error> {
    let template = match model.chat_template(None) {
        Ok(t) => t,
        // A base model without a template gets the text as it is.
        Err(_) => return Ok(request.prompt.clone()),
    };
    let message = |role: &str, content: &str| {
        LlamaChatMessage::new(role.to_string(), content.to_string())
            .map_err(|_| Error::invalid("the prompt contains a NUL byte"))
    };
    let mut chat = Vec::new();
    if let Some(system) = &request.system {
        chat.push(message("system", system)?);
    }
    chat.push(message("user", &request.prompt)?);
    model
        .apply_chat_template(&template, &chat, true)
        .map_err(|e| Error::worker(format!("cannot apply the model's chat template: {e}")))
}

pub(super) fn sampler(request: &GenerateRequest) -> LlamaSampler {
    let p = &request.params;
    if p.temperature <= 0.0 {
        return LlamaSampler::greedy();
    }
    let seed = p.seed.unwrap_or_else(rand::random);
    LlamaSampler::chain_simple([
        LlamaSampler::top_p(p.top_p, 1),
        LlamaSampler::temp(p.temperature),
        LlamaSampler::dist(seed),
    ])
}
