//! What a request becomes before it is decoded: its prompt (in the model's chat template, or raw),
//! and the sampler that picks its tokens (constrained by a grammar when the request asks for JSON).

use llama_cpp_2::model::{LlamaChatMessage, LlamaModel};
use llama_cpp_2::sampling::LlamaSampler;

use crate::error::Error;
use crate::protocol::{GenerateRequest, ResponseFormat, Role};

/// The prompt as the model expects it: a raw prompt as given; otherwise the conversation (the
/// request's `messages`, or its system prompt and prompt) in the model's own chat template.
pub(super) fn render_prompt(
    model: &LlamaModel,
    request: &GenerateRequest,
) -> Result<String, Error> {
    if request.raw {
        return Ok(request.prompt.clone());
    }
    let template = match model.chat_template(None) {
        Ok(t) => t,
        Err(_) if !request.messages.is_empty() => {
            return Err(Error::invalid(
                "the model has no chat template to render `messages` with; send a `raw` prompt",
            ));
        }
        // A base model without a template gets the text as it is.
        Err(_) => return Ok(request.prompt.clone()),
    };
    let message = |role: Role, content: &str| {
        LlamaChatMessage::new(role_name(role).to_string(), content.to_string())
            .map_err(|_| Error::invalid("the prompt contains a NUL byte"))
    };
    let mut chat = Vec::new();
    if request.messages.is_empty() {
        if let Some(system) = &request.system {
            chat.push(message(Role::System, system)?);
        }
        chat.push(message(Role::User, &request.prompt)?);
    } else {
        for m in &request.messages {
            chat.push(message(m.role, &m.content)?);
        }
    }
    model
        .apply_chat_template(&template, &chat, true)
        .map_err(|e| Error::worker(format!("cannot apply the model's chat template: {e}")))
}

/// The role's name as chat templates know it.
fn role_name(role: Role) -> &'static str {
    match role {
        Role::System => "system",
        Role::User => "user",
        Role::Assistant => "assistant",
    }
}

/// The request's sampler chain: the grammar of its format first (so that every later stage sees
/// only tokens that keep the output valid), then nucleus, temperature and the seeded draw; at
/// temperature 0 the most likely allowed token.
pub(super) fn sampler(
    model: &LlamaModel,
    request: &GenerateRequest,
) -> Result<LlamaSampler, Error> {
    let p = &request.params;
    let mut chain = Vec::new();
    if let Some(grammar) = grammar(&p.format)? {
        let sampler = LlamaSampler::grammar(model, &grammar, "root").map_err(|e| {
            Error::invalid(format!(
                "llama.cpp cannot build a grammar sampler for the format: {e}"
            ))
        })?;
        chain.push(sampler);
    }
    if p.temperature <= 0.0 {
        chain.push(LlamaSampler::greedy());
    } else {
        chain.push(LlamaSampler::top_p(p.top_p, 1));
        chain.push(LlamaSampler::temp(p.temperature));
        chain.push(LlamaSampler::dist(p.seed.unwrap_or_else(rand::random)));
    }
    Ok(LlamaSampler::chain_simple(chain))
}

/// The GBNF grammar that a format constrains output to, through llama.cpp's converter; `None`
/// for free text. A schema the converter refuses is the request's fault.
fn grammar(format: &ResponseFormat) -> Result<Option<String>, Error> {
    let schema = match format {
        ResponseFormat::Text => return Ok(None),
        ResponseFormat::JsonObject => serde_json::json!({ "type": "object" }),
        ResponseFormat::JsonSchema { schema } => schema.clone(),
    };
    llama_cpp_2::json_schema_to_grammar(&schema.to_string())
        .map(Some)
        .map_err(|e| {
            // The crate reports only the converter's status code, not its message: name the
            // usual causes so the user knows where to look.
            Error::invalid(format!(
                "llama.cpp's JSON schema converter refused the schema ({e}); it rejects \
                 unresolved `$ref`s, invalid `pattern` regexes and malformed keywords"
            ))
        })
}
