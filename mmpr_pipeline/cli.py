"""`mmpr`: build MMPR pairs, train with MPO, evaluate, publish.

Each subcommand's handler imports its module lazily, so `mmpr --help` is instant and
`mmpr publish` never imports vLLM.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

from mmpr_pipeline.error_policy import debug_requested, report

# Offline by default: the Hub is reached only by commands that say so (publish), or when the
# user unsets it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # our progress bar and summary are the log


def _overrides(pairs: list[str]) -> dict:
    """`--set KEY=VALUE` arguments as a dict: one parser for build, eval, train and the demo loop."""
    from mmpr_pipeline.recipe import parse_overrides

    return parse_overrides(pairs)


def _recipe(args):
    """The recipe named on the command line, with --model, --limit and --set applied."""
    from mmpr_pipeline import recipe as recipe_mod

    overrides = _overrides(args.set)
    if args.model:
        overrides["model"] = args.model
    if args.limit is not None:
        overrides["limit"] = args.limit
    return recipe_mod.load(args.recipe, overrides)


def _preflight(args, recipe) -> None:
    """Check the model, engine options, --out and sources before Ray and vLLM start."""
    from mmpr_pipeline import preflight

    preflight.check_build(recipe, args.out, model_from_cli=bool(args.model))


def cmd_build(args) -> int:
    from mmpr_pipeline import pipeline

    recipe = _recipe(args)
    _preflight(args, recipe)
    pipeline.build(
        recipe, args.out, overwrite=args.overwrite, ray_address=args.ray_address, verbose=args.verbose
    )
    return 0


def cmd_demo_model(args) -> int:
    from mmpr_pipeline import demo_model

    if args.rebuild:
        for path in demo_model.rebuild_shipped():
            print(path)
        return 0
    path = demo_model.ensure_trained(args.out, force=args.force)
    print(path)
    return 0


def cmd_eval(args) -> int:
    from mmpr_pipeline import evaluate

    recipe = _recipe(args)
    _preflight(args, recipe)
    evaluate.evaluate(recipe, args.out, ray_address=os.environ.get("RAY_ADDRESS"))
    return 0


def cmd_train(args) -> int:
    from mmpr_pipeline import train

    if args.plan:
        from mmpr_pipeline.train import plan

        return plan.cli_plan(args)
    return train.cli_train(args)


def cmd_publish(args) -> int:
    from mmpr_pipeline import hub

    return hub.cli_publish(args)


def cmd_preview(args) -> int:
    from mmpr_pipeline.preview import write_preview

    print(write_preview(args.run_dir, per_source=args.per_source, seed=args.seed))
    return 0


def cmd_select(args) -> int:
    from mmpr_pipeline import selection

    return selection.cli_select(args)


def cmd_export(args) -> int:
    from mmpr_pipeline import export

    return export.cli_export(args)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value} (leave it out for no limit)")
    return value


class _ListOptions(argparse.Action):
    """`--list-options`: print every key of a recipe or training config (type, default, help) and exit."""

    def __init__(self, option_strings, dest, config_class: str, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)
        self.config_class = config_class  # "module:Class", imported only when asked

    def __call__(self, parser, namespace, values, option_string=None):
        import importlib

        from mmpr_pipeline.config import options_text

        module, name = self.config_class.split(":")
        cls = getattr(importlib.import_module(module), name)
        print(options_text(cls, f"{name} keys (YAML file or --set KEY=VALUE):"), end="")
        parser.exit()


def _add_build_parser(sub) -> None:
    """`mmpr build RECIPE --out DIR`."""
    b = sub.add_parser("build", help="build preference pairs from a recipe (resumes an interrupted run)")
    b.add_argument("recipe", help="recipe YAML, e.g. data_cards/demo.yaml")
    b.add_argument("--out", required=True, help="run folder (created; an existing one is resumed)")
    b.add_argument("--model", help="Hub id or local path; overrides the recipe's model")
    b.add_argument(
        "--limit", type=_positive_int, help="questions per source (overrides every source's limit)"
    )
    b.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a recipe key, e.g. --set sampling.n=4 (repeatable)",
    )
    b.add_argument(
        "--list-options",
        action=_ListOptions,
        config_class="mmpr_pipeline.recipe:Recipe",
        help="print every recipe key with its type, default and help, and exit",
    )
    b.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in a run folder that was built with a different recipe",
    )
    b.add_argument(
        "--ray-address",
        default=os.environ.get("RAY_ADDRESS"),
        help="join a Ray cluster (default: $RAY_ADDRESS, else a local Ray)",
    )
    b.set_defaults(func=cmd_build)


def _add_demo_model_parser(sub) -> None:
    """`mmpr demo-model`."""
    d = sub.add_parser(
        "demo-model", help="put the bundled tiny demo model (shipped, hash-checked) in build/models/demo"
    )
    d.add_argument("--out", default=None, help="model folder (default: build/models/demo)")
    d.add_argument(
        "--force", action="store_true", help="train it here instead (weights then depend on this machine)"
    )
    d.add_argument(
        "--rebuild",
        action="store_true",
        help="retrain the shipped demo models (one thread, fixed seeds) and rewrite their SHA256SUMS",
    )
    d.set_defaults(func=cmd_demo_model)


def _add_eval_parser(sub) -> None:
    """`mmpr eval RECIPE --out DIR`."""
    e = sub.add_parser("eval", help="accuracy of a model on a recipe's sources (sample + judge, no pairs)")
    e.add_argument("recipe", help="recipe YAML whose sources to evaluate on")
    e.add_argument("--model", help="Hub id or local path; overrides the recipe's model")
    e.add_argument("--out", required=True, help="folder for eval results")
    e.add_argument("--limit", type=_positive_int, help="questions per source")
    e.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe key")
    e.set_defaults(func=cmd_eval)


def _add_train_parser(sub) -> None:
    """`mmpr train CONFIG`."""
    t = sub.add_parser("train", help="train a model with MPO on a run's pairs")
    t.add_argument("config", help="training config YAML, e.g. data_cards/train_mpo.yaml")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key")
    t.add_argument(
        "--plan",
        action="store_true",
        help="print the memory per process (weights, gradients, optimizer, reference) under ddp and fsdp, "
        "from the model's config, and exit without loading weights",
    )
    t.add_argument("--nproc", type=_positive_int, default=1, help="processes (GPUs) for --plan")
    t.add_argument("--json", action="store_true", help="--plan: also print the figures as one JSON line")
    t.add_argument(
        "--list-options",
        action=_ListOptions,
        config_class="mmpr_pipeline.train.config:MPOConfig",
        help="print every config key with its type, default and help, and exit",
    )
    t.set_defaults(func=cmd_train)


def _add_publish_parser(sub) -> None:
    """`mmpr publish RUN_DIR --repo-id USER/NAME`."""
    pub = sub.add_parser("publish", help="upload a run's shards and card to the Hugging Face Hub")
    pub.add_argument("run_dir")
    pub.add_argument("--repo-id", required=True, help="user/name of the dataset repo")
    pub.add_argument("--private", action="store_true")
    pub.add_argument("--revision", default=None, help="branch to upload to")
    pub.add_argument("--dry-run", action="store_true", help="print what would be uploaded, upload nothing")
    pub.set_defaults(func=cmd_publish)


def _add_export_parser(sub) -> None:
    """`mmpr export RUN_DIR --format F --out DIR`."""
    x = sub.add_parser("export", help="write a run's pairs in another trainer's format")
    x.add_argument("run_dir")
    x.add_argument("--format", required=True, choices=["trl", "internvl"])
    x.add_argument("--out", required=True, help="output folder")
    x.set_defaults(func=cmd_export)


def _add_preview_parser(sub) -> None:
    """`mmpr preview RUN_DIR`."""
    v = sub.add_parser(
        "preview", help="write RUN_DIR/preview.html: sampled pairs, verdicts, rejects (one file)"
    )
    v.add_argument("run_dir")
    v.add_argument("--per-source", type=int, default=20, help="pairs shown per source (default 20)")
    v.add_argument("--seed", type=int, default=0, help="seed of the pair sample (default 0)")
    v.set_defaults(func=cmd_preview)


def _add_select_parser(sub) -> None:
    """`mmpr select RUN_DIR (--pass-rate LO:HI | --all-wrong) --out DIR`."""
    s = sub.add_parser(
        "select",
        help="write a run's prompts by sampled accuracy (pass rate), as a dataset",
        description="Write the questions of RUN_DIR whose pass rate (the share of their sampled "
        "responses judged correct, read from samples/) lies in LO:HI, or that were "
        "never answered right (--all-wrong), as Parquet under OUT/data that a recipe "
        "(loader: parquet) or datasets.load_dataset('parquet', ...) loads. "
        "Correctness sources only.",
        epilog="e.g. mmpr select runs/demo --pass-rate 0.2:0.8 --out prompts/rl  "
        "(MMPR-Tiny's band for online RL); mmpr select runs/demo --all-wrong --out prompts/hard",
    )
    s.add_argument("run_dir", help="folder of an `mmpr build`")
    which = s.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--pass-rate", metavar="LO:HI", help="keep questions with LO <= pass rate <= HI (0 to 1)"
    )
    which.add_argument("--all-wrong", action="store_true", help="keep questions no sample answered right")
    s.add_argument("--out", required=True, help="new or empty output folder")
    s.set_defaults(func=cmd_select)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mmpr",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="exit codes: 0 done, 1 environment failure (disk, memory, network, engine), "
        "2 user error (named in the message), 130 interrupted (Ctrl-C), 143 terminated (SIGTERM); "
        "`mmpr publish`: 3 token, 4 network",
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="debug logging, and Ray's and vLLM's output on the terminal",
    )
    p.add_argument(
        "--debug",
        action="store_true",
        default=debug_requested(),
        help="show the traceback of an error (also MMPR_DEBUG=1)",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_build_parser(sub)
    _add_demo_model_parser(sub)
    _add_eval_parser(sub)
    _add_train_parser(sub)
    _add_publish_parser(sub)
    _add_export_parser(sub)
    _add_preview_parser(sub)
    _add_select_parser(sub)
    return p


INTERRUPTED = 130  # Ctrl-C (SIGTERM: stopping.EXIT_CODE, 143)


def _resume_hint(args) -> str:
    if getattr(args, "resume_hint", None):  # set by a command that knows more (train: its output_dir)
        return args.resume_hint
    if args.command == "build":
        return f"finished work units are kept in {args.out}: run the same command again to resume"
    if args.command == "eval":
        return f"finished work units are kept under {args.out}: run the same command again to resume"
    if args.command == "export":
        return f"{args.out} was left as it was"
    if args.command == "publish":
        return "files already uploaded stay on the Hub: run the same command again to resume"
    return "stopped"


def _logs_hint(args) -> str:
    """Where a failed build's Ray and vLLM output is (runlogs.py), when it got that far."""
    from mmpr_pipeline.runlogs import logs_dir

    if args.command != "build" or args.verbose or not logs_dir(args.out).is_dir():
        return ""
    return f" (Ray's and vLLM's logs: {logs_dir(args.out)}/)"


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from mmpr_pipeline import stopping

    stopping.install()  # SIGTERM stops as Ctrl-C does
    try:
        return args.func(args) or 0
    except KeyboardInterrupt as e:
        if args.debug:
            traceback.print_exc()
        # Said first: it is what the user needs, whatever happens while the processes end.
        terminated = isinstance(e, stopping.Terminated)
        print(
            f"\n{'terminated (SIGTERM)' if terminated else 'interrupted'}: {_resume_hint(args)}",
            file=sys.stderr,
        )
        sys.stderr.flush()
    except Exception as e:  # noqa: BLE001 - the one place every error becomes a message
        return report(e, args.debug, suffix=_logs_hint(args))
    # Out of the except block, so the interrupt's traceback (its frames hold Ray object references) is
    # garbage before Ray shuts down. Ray's and vLLM's processes end with the command, not minutes later.
    stopping.end_run()
    return stopping.EXIT_CODE if terminated else INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
