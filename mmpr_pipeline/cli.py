"""`mmpr`: build MMPR pairs, train with MPO, evaluate, publish.

Each subcommand's handler imports its module lazily, so `mmpr --help` is instant and
`mmpr publish` never imports vLLM.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

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
    if args.limit:
        overrides["limit"] = args.limit
    return recipe_mod.load(args.recipe, overrides)


def cmd_build(args) -> int:
    from mmpr_pipeline import pipeline

    pipeline.build(_recipe(args), args.out, overwrite=args.overwrite, ray_address=args.ray_address)
    return 0


def cmd_demo_model(args) -> int:
    from mmpr_pipeline import demo_model

    path = demo_model.ensure_trained(args.out, force=args.force)
    print(path)
    return 0


def cmd_eval(args) -> int:
    from mmpr_pipeline import evaluate

    evaluate.evaluate(_recipe(args), args.out, ray_address=os.environ.get("RAY_ADDRESS"))
    return 0


def cmd_train(args) -> int:
    from mmpr_pipeline import train

    return train.cli_train(args)


def cmd_publish(args) -> int:
    from mmpr_pipeline import hub

    return hub.cli_publish(args)


def cmd_export(args) -> int:
    from mmpr_pipeline import export

    return export.cli_export(args)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmpr", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    b = sub.add_parser("build", help="build preference pairs from a recipe (resumes an interrupted run)")
    b.add_argument("recipe", help="recipe YAML, e.g. data_cards/demo.yaml")
    b.add_argument("--out", required=True, help="run folder (created; an existing one is resumed)")
    b.add_argument("--model", help="Hub id or local path; overrides the recipe's model")
    b.add_argument("--limit", type=int, help="questions per source (overrides every source's limit)")
    b.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set sampling.n=4 (repeatable)")
    b.add_argument("--overwrite", action="store_true",
                   help="start over in a run folder that was built with a different recipe")
    b.add_argument("--ray-address", default=os.environ.get("RAY_ADDRESS"),
                   help="join a Ray cluster (default: $RAY_ADDRESS, else a local Ray)")
    b.set_defaults(func=cmd_build)

    d = sub.add_parser("demo-model", help="build and train the bundled tiny demo model (cached)")
    d.add_argument("--out", default=None, help="model folder (default: build/models/demo)")
    d.add_argument("--force", action="store_true", help="rebuild even if it exists")
    d.set_defaults(func=cmd_demo_model)

    e = sub.add_parser("eval", help="accuracy of a model on a recipe's sources (sample + judge, no pairs)")
    e.add_argument("recipe", help="recipe YAML whose sources to evaluate on")
    e.add_argument("--model", help="Hub id or local path; overrides the recipe's model")
    e.add_argument("--out", required=True, help="folder for eval results")
    e.add_argument("--limit", type=int, help="questions per source")
    e.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe key")
    e.set_defaults(func=cmd_eval)

    t = sub.add_parser("train", help="train a model with MPO on a run's pairs")
    t.add_argument("config", help="training config YAML, e.g. data_cards/train_mpo.yaml")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key")
    t.set_defaults(func=cmd_train)

    pub = sub.add_parser("publish", help="upload a run's shards and card to the Hugging Face Hub")
    pub.add_argument("run_dir")
    pub.add_argument("--repo-id", required=True, help="user/name of the dataset repo")
    pub.add_argument("--private", action="store_true")
    pub.add_argument("--revision", default=None, help="branch to upload to")
    pub.add_argument("--dry-run", action="store_true", help="print what would be uploaded, upload nothing")
    pub.set_defaults(func=cmd_publish)

    x = sub.add_parser("export", help="write a run's pairs in another trainer's format")
    x.add_argument("run_dir")
    x.add_argument("--format", required=True, choices=["trl", "internvl"])
    x.add_argument("--out", required=True, help="output folder")
    x.set_defaults(func=cmd_export)
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from mmpr_pipeline.pipeline import RunFolderError
    from mmpr_pipeline.recipe import RecipeError
    from stages.load import SourceError

    try:
        return args.func(args) or 0
    except (RecipeError, SourceError, RunFolderError) as e:  # bad input: a clear message, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
