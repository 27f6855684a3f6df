"""Generated tokens/s of the pipeline's sample stage against a bare `vllm.LLM.generate` loop.

Both run in this one process over the same prompts with the same engine settings:
  baseline  the engine's own `LLM.generate` on pre-rendered prompts and decoded images
  stage     `stages.sample.SampleStage.__call__` on an Arrow batch of questions (prompt building,
            image decoding, chat templating, Arrow in/out) on the *same* engine instance
  dropout   the DropoutNTP continuation pass (text-only, prefixes of the stage's responses)
With --ray, the stage also runs as the real Ray Data actor stage (its own engine in an actor).
`ignore_eos` with long `max_tokens` makes generation, not start-up, dominate.

    python benchmarks/bench_sampling.py [--model PATH] [--questions 64] [--n 8] [--max-tokens 256] [--ray]
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model path (default: a freshly built tiny model)")
    ap.add_argument("--questions", type=int, default=64)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=2, help="alternating runs of each; the best is kept")
    ap.add_argument("--ray", action="store_true", help="also time the Ray Data actor stage")
    args = ap.parse_args()

    import tempfile

    import pyarrow as pa

    from mmpr_pipeline import demo_model, recipe as recipe_mod
    from mmpr_pipeline.engine import request_seed
    from mmpr_pipeline.prompts import render
    from mmpr_pipeline.records import QUESTION_SCHEMA, decode_image
    from stages.load import load_source
    from stages.sample import SampleStage

    model = args.model or str(demo_model.build(tempfile.mkdtemp() + "/tiny", "tiny"))
    rec = recipe_mod.load("data_cards/demo.yaml", {
        "model": model, "sources[0].limit": args.questions, "sources[1].limit": args.questions // 2,
        "sampling.n": args.n, "sampling.max_tokens": args.max_tokens, "engine.max_model_len": 1024})
    shapes, describe = (load_source(s, 10**9)[0] for s in rec.sources)
    extra = {"ignore_eos": True}
    stage = SampleStage(model, rec.engine, rec.seed, rec.sampling,
                        {s.name: rec.template_for(s) for s in rec.sources},
                        {s.name: s.dropout for s in rec.sources}, sampling_extra=extra)
    llm, s = stage.engine.llm, rec.sampling
    # the same per-question seeds the stage uses (recipe default `sampling.reproducible`)
    params = [stage.engine.params(n=s.n, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                                  max_tokens=s.max_tokens, seed=request_seed(rec.seed, q["qid"]), **extra)
              for q in shapes]
    tokenizer = llm.get_tokenizer()
    prompts = [{"prompt": tokenizer.apply_chat_template(
                    [{"role": "user", "content": [{"type": "image"}, {"type": "text",
                      "text": render("cot_final_answer", q["question"])}]}],
                    tokenize=False, add_generation_prompt=True),
                "multi_modal_data": {"image": decode_image(q["image"])}} for q in shapes]
    llm.generate(prompts[:2], params[:2], use_tqdm=False)  # warm-up, both paths share it

    def timed(fn):
        t0 = time.perf_counter()
        tokens = fn()
        dt = time.perf_counter() - t0
        return tokens, dt, tokens / dt

    def bare():
        total = 0
        for i in range(0, len(prompts), args.batch_size):
            outs = llm.generate(prompts[i:i + args.batch_size], params[i:i + args.batch_size], use_tqdm=False)
            total += sum(len(o.token_ids) for out in outs for o in out.outputs)
        return total

    def staged():
        total = 0
        for i in range(0, len(shapes), args.batch_size):
            table = stage(pa.Table.from_pylist(shapes[i:i + args.batch_size], schema=QUESTION_SCHEMA))
            total += sum(sum(x) for x in table.column("n_tokens").to_pylist())
        return total

    # Alternate the two and keep each one's best run, so warm-up and a busy neighbour core do not
    # favour whichever runs second.
    runs = [(timed(bare), timed(staged)) for _ in range(args.repeat)]
    base = max((r[0] for r in runs), key=lambda t: t[2])
    ours = max((r[1] for r in runs), key=lambda t: t[2])
    drop_rows = stage(pa.Table.from_pylist(describe, schema=QUESTION_SCHEMA)).to_pylist()
    drop_sample_s = sum(r["sample_seconds"] for r in drop_rows)
    drop_cont_s = sum(r["continue_seconds"] for r in drop_rows)
    drop_sample_tok = sum(sum(r["n_tokens"]) for r in drop_rows)
    drop_cont_tok = sum(sum(r["continuation_tokens"]) for r in drop_rows)

    print(f"workload: {len(shapes)} image questions x n={s.n} x max_tokens={s.max_tokens} (ignore_eos), "
          f"batch {args.batch_size}, model {model}")
    print(f"best of {args.repeat} alternating runs each")
    print(f"baseline  bare LLM.generate   {base[0]:>8} tokens in {base[1]:6.2f}s  {base[2]:9.0f} tok/s")
    print(f"stage     SampleStage         {ours[0]:>8} tokens in {ours[1]:6.2f}s  {ours[2]:9.0f} tok/s")
    print(f"ratio stage/baseline: {ours[2] / base[2]:.3f}  (target >= 0.9)")
    print(f"dropout_ntp ({len(drop_rows)} questions): sampling with image {drop_sample_tok} tok in {drop_sample_s:.2f}s "
          f"({drop_sample_tok / max(drop_sample_s, 1e-9):.0f} tok/s); continuation without image "
          f"{drop_cont_tok} tok in {drop_cont_s:.2f}s ({drop_cont_tok / max(drop_cont_s, 1e-9):.0f} tok/s)")
    if args.ray:
        import ray

        del stage, llm
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        ds = ray.data.from_arrow(pa.Table.from_pylist(shapes, schema=QUESTION_SCHEMA)).map_batches(
            SampleStage, batch_size=args.batch_size, batch_format="pyarrow", concurrency=1, num_cpus=1,
            fn_constructor_kwargs=dict(model=model, engine_options=rec.engine, seed=rec.seed, sampling=rec.sampling,
                                       templates={x.name: rec.template_for(x) for x in rec.sources},
                                       dropout={x.name: x.dropout for x in rec.sources}, sampling_extra=extra))
        t0 = time.perf_counter()
        rows = ds.take_all()
        wall = time.perf_counter() - t0
        tok = sum(sum(r["n_tokens"]) for r in rows)
        engine_s = sum(r["sample_seconds"] for r in rows)
        print(f"ray stage  {tok} tokens: {tok / wall:.0f} tok/s wall incl. actor + engine start-up ({wall:.1f}s), "
              f"{tok / engine_s:.0f} tok/s inside the actor; ratio (inside) vs baseline: {tok / engine_s / base[2]:.3f}")


if __name__ == "__main__":
    main()
