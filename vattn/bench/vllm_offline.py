"""vLLM's offline throughput on a request file, run by the peer environment's python (it imports vLLM and the
standard library only; never vattn, which is not installed there).

    .venv-peers/bin/python vattn/bench/vllm_offline.py --spec spec.json --out result.json

spec.json: {"model", "dtype", "max_num_seqs", "max_model_len", "max_num_batched_tokens", "enable_prefix_caching",
            "seed", "requests": [{"request_id", "prompt_token_ids", "max_tokens", "n", "beam_width"}]}
result.json: {"vllm_version", "torch_version", "elapsed_s", "output_tokens", "tokens": {request_id: [...]}}
One warm-up request runs first and is not timed. Greedy with ignore_eos (every request yields max_tokens tokens),
n > 1 samples at temperature 1 (seeded), beam_width > 0 through LLM.beam_search.
"""

import argparse
import json
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    spec = json.loads(open(args.spec).read())

    import torch
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=spec["model"], dtype=spec["dtype"], max_num_seqs=spec["max_num_seqs"],
              max_model_len=spec["max_model_len"], max_num_batched_tokens=spec["max_num_batched_tokens"],
              enable_prefix_caching=spec["enable_prefix_caching"], seed=spec["seed"], skip_tokenizer_init=False)
    reqs = spec["requests"]
    beams = [r for r in reqs if r.get("beam_width")]
    plain = [r for r in reqs if not r.get("beam_width")]

    def params(r):
        if r.get("n", 1) > 1:
            return SamplingParams(n=r["n"], temperature=1.0, seed=spec["seed"], max_tokens=r["max_tokens"],
                                  ignore_eos=True)
        return SamplingParams(temperature=0, max_tokens=r["max_tokens"], ignore_eos=True)

    llm.generate([TokensPrompt(prompt_token_ids=reqs[0]["prompt_token_ids"][:16])],
                 SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    tokens, n_out = {}, 0
    t0 = time.perf_counter()
    if plain:
        outs = llm.generate([TokensPrompt(prompt_token_ids=r["prompt_token_ids"]) for r in plain],
                            [params(r) for r in plain], use_tqdm=False)
        for r, o in zip(plain, outs):
            tokens[r["request_id"]] = list(o.outputs[0].token_ids)
            n_out += sum(len(c.token_ids) for c in o.outputs)
    if beams:
        from vllm.sampling_params import BeamSearchParams

        for r in beams:  # one call per width (vLLM's beam search takes one params object)
            out = llm.beam_search([TokensPrompt(prompt_token_ids=r["prompt_token_ids"])],
                                  BeamSearchParams(beam_width=r["beam_width"], max_tokens=r["max_tokens"],
                                                   ignore_eos=True))
            seq = out[0].sequences[0]
            gen = list(seq.tokens[len(r["prompt_token_ids"]):])
            tokens[r["request_id"]] = gen
            n_out += len(gen)
    elapsed = time.perf_counter() - t0
    with open(args.out, "w") as f:
        json.dump({"vllm_version": vllm.__version__, "torch_version": torch.__version__, "elapsed_s": elapsed,
                   "output_tokens": n_out, "tokens": tokens}, f)


if __name__ == "__main__":
    main()
