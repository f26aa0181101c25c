//! What a request becomes before it is decoded: its prompt (in the model's chat template, or raw),
//! and the sampler that picks its tokens (constrained by a grammar when the request asks for JSON).

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::model::{LlamaChatMessage, LlamaModel};
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::token::data::LlamaTokenData;
use llama_cpp_2::token::data_array::LlamaTokenDataArray;

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

/// The request's sampler chain (nucleus, temperature and the seeded draw; at temperature 0 the
/// most likely token) and its format's grammar, which `Sampling::sample` checks each pick
/// against so that only tokens that keep the output valid are taken.
pub(super) fn sampler(model: &LlamaModel, request: &GenerateRequest) -> Result<Sampling, Error> {
    let p = &request.params;
    let grammar = match grammar(&p.format)? {
        Some(grammar) => Some(LlamaSampler::grammar(model, &grammar, "root").map_err(|e| {
            Error::invalid(format!(
                "llama.cpp cannot build a grammar sampler for the format: {e}"
            ))
        })?),
        None => None,
    };
    let chain = if p.temperature <= 0.0 {
        vec![LlamaSampler::greedy()]
    } else {
        vec![
            LlamaSampler::top_p(p.top_p, 1),
            LlamaSampler::temp(p.temperature),
            LlamaSampler::dist(p.seed.unwrap_or_else(rand::random)),
        ]
    };
    Ok(Sampling {
        chain: LlamaSampler::chain_simple(chain),
        grammar,
    })
}

/// How a generation picks its tokens: the request's sampler chain and, for a JSON format, the
/// grammar the output must follow.
pub(super) struct Sampling {
    chain: LlamaSampler,
    grammar: Option<LlamaSampler>,
}

impl Sampling {
    /// The next token from row `idx` of the last pass's logits. Under a grammar, the chain picks
    /// from the whole vocabulary first and the grammar checks only that token; only a token it
    /// refuses costs the grammar's pass over the whole vocabulary, and the chain then picks
    /// among what it allows (as llama.cpp's own common sampler does). Most tokens of a JSON text
    /// pass, and a grammar pass over the ~50,000 tokens of a vocabulary costs more than the
    /// model's own decode step on a small model. Greedy, the choice is the same as the grammar's
    /// pass first would give (the most likely token of the whole vocabulary is the most likely
    /// of any part of it that holds it); a draw kept when allowed and made again among the
    /// allowed otherwise is a draw from the allowed tokens' distribution, only with top-p's cut
    /// taken over the whole vocabulary.
    pub(super) fn sample(&mut self, ctx: &LlamaContext<'_>, idx: i32) -> Result<LlamaToken, Error> {
        let token = self.chain.sample(ctx, idx);
        let Some(grammar) = self.grammar.as_mut() else {
            return Ok(token);
        };
        let mut one = LlamaTokenDataArray::new(vec![LlamaTokenData::new(token, 1.0, 0.0)], false);
        grammar.apply(&mut one);
        let allowed = one.data.first().is_some_and(|t| t.logit().is_finite());
        let token = if allowed {
            token
        } else {
            let mut all = LlamaTokenDataArray::from_iter(ctx.candidates_ith(idx), false);
            grammar.apply(&mut all);
            // A grammar at a dead end (or logits that are not numbers) leaves every logit at
            // minus infinity; a draw among them would hand the grammar a token it refuses, which
            // llama.cpp answers by aborting the process. It belongs to this request (its format,
            // model and seed), which another node would repeat: not a worker fault to fail over.
            if !all.data.iter().any(|t| t.logit().is_finite()) {
                return Err(Error::invalid(
                    "the format's grammar allows no next token for this output",
                ));
            }
            self.chain.apply(&mut all);
            // The chain's pick, if it is one the grammar allows.
            let picked = all
                .selected
                .and_then(|i| all.data.get(i))
                .filter(|t| t.logit().is_finite())
                .map(|t| t.id())
                .ok_or_else(|| {
                    Error::invalid("the sampler picked no token the format's grammar allows")
                })?;
            self.chain.accept(picked);
            picked
        };
        grammar.accept(token);
        Ok(token)
    }
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
