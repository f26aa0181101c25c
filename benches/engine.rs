//! The raw engine: llama-cpp-2 in-process, no rbee code, on the default model with the same
//! thread count as a worker (all cores). Prints prefill and decode tokens/s for one sequence,
//! and the aggregate decode tokens/s of 2, 4 and 8 sequences decoded in one batch per step
//! (one KV stream each, as a worker does), medians of 3 runs; and the time to the first token of
//! the prompt "hi" (prefill and one sample on a loaded context), median of 5. `--decode N` and
//! `--batched N` print single runs, for benchmarks that alternate them with other tools.
//! `cargo bench --bench engine` (RBEE_TEST_MODEL or ~/.cache/rbee/models/...); ENGINE_CONTEXT
//! sets the context per sequence (default 4096, a worker's), to see what its size costs.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::num::NonZeroU32;
use std::time::Instant;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaModel};
use llama_cpp_2::sampling::LlamaSampler;

/// The prompt scripts/bench.sh gives `rbee infer` for its decode figure: both decode the same
/// tokens.
const PROMPT: &str = "Write a long essay about bicycles.";
const TOKENS: usize = 128;
const DEFAULT_CONTEXT: u32 = 4096;

fn main() {
    let path = std::env::var("RBEE_TEST_MODEL").unwrap_or_else(|_| {
        format!(
            "{}/.cache/rbee/models/SmolLM2-135M-Instruct.Q4_1.gguf",
            std::env::var("HOME").unwrap()
        )
    });
    let context: u32 = match std::env::var("ENGINE_CONTEXT") {
        Err(_) => DEFAULT_CONTEXT,
        Ok(c) => match c.parse() {
            Ok(n) if n > 0 => n,
            _ => {
                eprintln!("engine: ENGINE_CONTEXT must be a positive number of tokens, not {c:?}");
                std::process::exit(2);
            }
        },
    };
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
    let run = |seqs: usize| {
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(context * seqs as u32))
            .with_n_seq_max(seqs as u32)
            .with_kv_unified(false)
            .with_n_batch(context)
            .with_n_threads(threads)
            .with_n_threads_batch(threads);
        let mut ctx = model.new_context(&backend, params).expect("context");
        let mut batch = LlamaBatch::new(context as usize, 1);
        let mut prefill = 0.0;
        for seq in 0..seqs as i32 {
            batch.clear();
            for (i, t) in tokens.iter().enumerate() {
                batch
                    .add(*t, i as i32, &[seq], i + 1 == tokens.len())
                    .unwrap();
            }
            let t = Instant::now();
            ctx.decode(&mut batch).expect("prefill");
            prefill = tokens.len() as f64 / t.elapsed().as_secs_f64();
        }
        let mut samplers: Vec<LlamaSampler> = (0..seqs).map(|_| LlamaSampler::greedy()).collect();
        let mut next: Vec<_> = samplers
            .iter_mut()
            .map(|s| s.sample(&ctx, batch.n_tokens() - 1))
            .collect();
        let t = Instant::now();
        for pos in (tokens.len() as i32..).take(TOKENS) {
            batch.clear();
            for (seq, token) in next.iter().enumerate() {
                batch.add(*token, pos, &[seq as i32], true).unwrap();
            }
            ctx.decode(&mut batch).expect("decode");
            for (i, (s, token)) in samplers.iter_mut().zip(next.iter_mut()).enumerate() {
                *token = s.sample(&ctx, i as i32);
            }
        }
        ((TOKENS * seqs) as f64 / t.elapsed().as_secs_f64(), prefill)
    };
    let median = |seqs: usize| {
        let mut runs: Vec<(f64, f64)> = (0..3).map(|_| run(seqs)).collect();
        runs.sort_by(|a, b| a.0.total_cmp(&b.0));
        let decode = runs[1].0;
        runs.sort_by(|a, b| a.1.total_cmp(&b.1));
        (decode, runs[1].1)
    };
    // `--decode N`: only N single-sequence decode runs, one figure each, for interleaving with
    // rbee runs (scripts/bench.sh).
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--decode") {
        let n: usize = args.get(i + 1).and_then(|n| n.parse().ok()).unwrap_or(1);
        for _ in 0..n {
            println!("raw engine decode: {:.1} tokens/s", run(1).0);
        }
        return;
    }
    // `--batched N`: one run of N sequences decoded together, for interleaving with
    // llama-server's N-way rows (scripts/bench_llama.sh): the most any orchestration of this
    // engine could reach, since it leaves out prefill, HTTP and the relays.
    if let Some(i) = args.iter().position(|a| a == "--batched") {
        let n: usize = args.get(i + 1).and_then(|n| n.parse().ok()).unwrap_or(4);
        println!(
            "raw engine batched: {n} sequences, aggregate decode {:.1} tokens/s",
            run(n).0
        );
        return;
    }
    let (decode, prefill) = median(1);
    println!(
        "raw engine: prefill {prefill:.1} tokens/s ({} tokens), decode {decode:.1} tokens/s ({TOKENS} tokens), {threads} threads",
        tokens.len()
    );
    {
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(context))
            .with_n_batch(context)
            .with_n_threads(threads)
            .with_n_threads_batch(threads);
        let mut ctx = model.new_context(&backend, params).expect("context");
        let chat = [LlamaChatMessage::new("user".into(), "hi".into()).unwrap()];
        let text = model
            .apply_chat_template(&template, &chat, true)
            .expect("apply");
        let hi = model.vocab().tokenize(text.as_bytes(), true, true);
        let mut batch = LlamaBatch::new(context as usize, 1);
        let mut times: Vec<f64> = (0..5)
            .map(|_| {
                ctx.clear_kv_cache();
                batch.clear();
                for (i, t) in hi.iter().enumerate() {
                    batch.add(*t, i as i32, &[0], i + 1 == hi.len()).unwrap();
                }
                let t = Instant::now();
                ctx.decode(&mut batch).expect("prefill");
                let _first = LlamaSampler::greedy().sample(&ctx, batch.n_tokens() - 1);
                t.elapsed().as_secs_f64() * 1000.0
            })
            .collect();
        times.sort_by(f64::total_cmp);
        println!(
            "raw engine first token: {:.1} ms (prompt \"hi\", {} tokens)",
            times[2],
            hi.len()
        );
    }
    for seqs in [2, 4, 8] {
        let (decode, _) = median(seqs);
        println!("raw engine batched: {seqs} sequences, aggregate decode {decode:.1} tokens/s");
    }
}
