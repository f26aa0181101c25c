//! The raw engine: llama-cpp-2 in-process, no rbee code, on the default model with the same
//! thread count as a worker (all cores). Prints prefill and decode tokens/s, median of 3 runs.
//! `cargo bench --bench engine` (RBEE_TEST_MODEL or ~/.cache/rbee/models/...).

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::num::NonZeroU32;
use std::time::Instant;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaModel};
use llama_cpp_2::sampling::LlamaSampler;

const PROMPT: &str = "Write a long, detailed essay about the history of the bicycle.";
const TOKENS: usize = 128;

fn main() {
    let path = std::env::var("RBEE_TEST_MODEL").unwrap_or_else(|_| {
        format!(
            "{}/.cache/rbee/models/SmolLM2-135M-Instruct.Q4_1.gguf",
            std::env::var("HOME").unwrap()
        )
    });
    let mut backend = LlamaBackend::init().expect("backend");
    backend.void_logs();
    let model =
        LlamaModel::load_from_file(&backend, &path, &LlamaModelParams::default()).expect("model");
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as i32;
    let template = model.chat_template(None).expect("template");
    let chat = [LlamaChatMessage::new("user".into(), PROMPT.into()).unwrap()];
    let text = model
        .apply_chat_template(&template, &chat, true)
        .expect("apply");
    let tokens = model.vocab().tokenize(text.as_bytes(), true, true);
    let (mut prefills, mut decodes) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(4096))
            .with_n_batch(4096)
            .with_n_threads(threads)
            .with_n_threads_batch(threads);
        let mut ctx = model.new_context(&backend, params).expect("context");
        let mut batch = LlamaBatch::new(4096, 1);
        for (i, t) in tokens.iter().enumerate() {
            batch
                .add(*t, i as i32, &[0], i + 1 == tokens.len())
                .unwrap();
        }
        let t = Instant::now();
        ctx.decode(&mut batch).expect("prefill");
        prefills.push(tokens.len() as f64 / t.elapsed().as_secs_f64());
        let mut sampler = LlamaSampler::greedy();
        let t = Instant::now();
        for pos in (tokens.len() as i32..).take(TOKENS) {
            let token = sampler.sample(&ctx, batch.n_tokens() - 1);
            batch.clear();
            batch.add(token, pos, &[0], true).unwrap();
            ctx.decode(&mut batch).expect("decode");
        }
        decodes.push(TOKENS as f64 / t.elapsed().as_secs_f64());
    }
    prefills.sort_by(f64::total_cmp);
    decodes.sort_by(f64::total_cmp);
    println!(
        "raw engine: prefill {:.1} tokens/s ({} tokens), decode {:.1} tokens/s ({TOKENS} tokens), {threads} threads",
        prefills[1],
        tokens.len(),
        decodes[1]
    );
}
