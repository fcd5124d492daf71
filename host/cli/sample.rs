//! `tessera sample`: text from a GPT checkpoint of `tessera train --model gpt --save FILE`,
//! decoded incrementally on the CPU with a key/value cache.

use std::time::Instant;

use tessera::checkpoint::Checkpoint;
use tessera::nn::decode::check_sampling;
use tessera::nn::{GptConfig, GptDecoder, MlpConfig};
use tessera::rng::Rng;
use tessera::Error;

use super::args::SampleArgs;

/// `tessera sample`.
pub(crate) fn sample(a: SampleArgs) -> tessera::Result<()> {
    check_sampling(a.temperature, a.top_k).map_err(|e| match e {
        Error::Invalid(m) => Error::Invalid(format!("--temperature / --top-k: {m}")),
        e => e,
    })?;
    let path = a.checkpoint.display().to_string();
    let fail = |reason: String| Error::Checkpoint { path: path.clone(), reason };
    let ck = Checkpoint::load(&a.checkpoint)?;
    let gpt = GptConfig::from_description(&ck.model).ok_or_else(|| {
        fail(if MlpConfig::from_description(&ck.model).is_some() {
            format!(
                "it holds the model `{}`, an image classifier: tessera sample writes text from a GPT's checkpoint \
                 (tessera train --model gpt --save FILE)",
                ck.model
            )
        } else {
            format!("it holds the model `{}`, not a GPT that tessera sample can run", ck.model)
        })
    })?;
    let vocab: Vec<char> = ck
        .vocab
        .as_ref()
        .ok_or_else(|| {
            fail("it has no vocabulary (metadata `vocab`), so its token ids cannot be turned into text".into())
        })?
        .chars()
        .collect();
    if vocab.len() != gpt.vocab {
        return Err(fail(format!(
            "its vocabulary lists {} characters, but the model has {} tokens",
            vocab.len(),
            gpt.vocab
        )));
    }
    let prompt: Vec<u32> = a
        .prompt
        .chars()
        .enumerate()
        .map(|(i, ch)| {
            vocab.iter().position(|&v| v == ch).map(|p| p as u32).ok_or_else(|| {
                let known: String = vocab.iter().collect();
                let default = if a.prompt == "\n" { " (the default prompt is a newline: give --prompt)" } else { "" };
                Error::Invalid(format!(
                    "--prompt: the character {ch:?} (at {i}) is not in the model's vocabulary of {} characters, \
                     {known:?}{default}",
                    vocab.len()
                ))
            })
        })
        .collect::<tessera::Result<_>>()?;
    if prompt.is_empty() {
        return Err(Error::Invalid("--prompt is empty: give at least one character to start from".into()));
    }
    if prompt.len() > gpt.t {
        return Err(Error::Invalid(format!(
            "--prompt is {} characters, longer than the model's context of {}: shorten it to its last {} or fewer",
            prompt.len(),
            gpt.t,
            gpt.t
        )));
    }
    let mut dec = GptDecoder::new(gpt, &ck.tensors, &ck.params).map_err(|e| fail(e.to_string()))?;
    let mut rng = Rng::new(a.seed);
    let t0 = Instant::now();
    let mut text = String::new();
    let streaming = !a.json;
    if streaming {
        out!("{}", a.prompt);
    }
    let written = dec.generate(&prompt, a.tokens, a.temperature, a.top_k, &mut rng, |id| {
        let ch = vocab[id as usize];
        if streaming {
            out!("{ch}");
            // A reader that went away (`| head`) ends the writing.
            !super::output::stdout_gone()
        } else {
            text.push(ch);
            true
        }
    })?;
    let secs = t0.elapsed().as_secs_f64();
    if a.json {
        let j = serde_json::json!({
            "model": ck.model,
            "checkpoint": path,
            "step": ck.step,
            "prompt": a.prompt,
            "text": text,
            "tokens": written,
            "temperature": a.temperature,
            "top_k": a.top_k,
            "seed": a.seed,
            "seconds": secs,
            "tokens_per_second": written as f64 / secs.max(1e-9),
        });
        outln!("{j}");
    } else {
        outln!();
        errln!(
            "{} tokens in {:.3} s ({:.0} tokens/s) from {} (step {})",
            written,
            secs,
            written as f64 / secs.max(1e-9),
            path,
            ck.step
        );
    }
    Ok(())
}
