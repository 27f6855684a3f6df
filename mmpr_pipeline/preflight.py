"""Checks that run before any engine starts, so a mistake costs a second and one line, not a 20 s
vLLM start-up and 150 lines of someone else's traceback.

- the model: `demo`, a local model folder (with config.json), a .gguf file, or a Hub id (which,
  offline, must already be in the Hugging Face cache; online, must exist: one bounded request);
- a model folder that asks to run its own code (`auto_map`) only with `trust_remote_code: true`;
- the recipe's `engine:` keys: options `vllm.EngineArgs` has, read from vLLM's source (importing
  vLLM takes 10-20 s);
- `--out`: a folder that can be created and written, whose recipe.json, if any, can be read;
- every source gives at least one question (reading stops at the first usable row).

Each failure is a PreflightError naming the file, key or path and the reason.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import os
import re
import tempfile
from collections import Counter
from functools import lru_cache
from pathlib import Path

from mmpr_pipeline import storage
from mmpr_pipeline.recipe import DEMO_MODEL, Recipe

# A Hub repo id: "name" or "owner/name"; anything else that is not on disk is a missing path.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")


class PreflightError(ValueError):
    """A setting that would fail once the engine starts; the message names where it came from."""


def check_model(model: str, where: str) -> None:
    """`model` names something an engine can load; `where` says where it was set (for the message)."""
    if model == DEMO_MODEL:
        return
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise PreflightError(f"{where}: {model} is a folder without config.json, not a model folder")
        return
    if path.is_file():
        if path.suffix != ".gguf":
            raise PreflightError(
                f"{where}: {model} is a file; give a model folder (with config.json), "
                "a .gguf file or a Hub id"
            )
        return
    if not HUB_ID.match(model):
        raise PreflightError(f"{where}: {model}: no such folder")
    from huggingface_hub import constants, try_to_load_from_cache

    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in (
        "1",
        "ON",
        "YES",
        "TRUE",
    )
    cached = isinstance(try_to_load_from_cache(model, "config.json"), str)
    if offline and not cached:
        raise PreflightError(
            f"{where}: {model} is not a local folder, and not in the Hugging Face cache while offline mode "
            "is on (HF_HUB_OFFLINE=1): give a local model folder, or set HF_HUB_OFFLINE=0 to download it"
        )
    if not cached:
        check_on_hub(model, where)


def hub_check_timeout() -> float:
    """Seconds the preflight waits for the Hub (MMPR_HUB_CHECK_TIMEOUT, default 10): a model that
    cannot be found costs seconds, not vLLM's minutes of retries."""
    try:
        return max(0.1, float(os.environ.get("MMPR_HUB_CHECK_TIMEOUT", "10")))
    except ValueError:
        return 10.0


def check_on_hub(model: str, where: str) -> None:
    """Online, a Hub id not in the cache: one request says whether it exists, before any folder or
    engine is made. A model that exists but is gated or private is left to the download (with a token
    it may work)."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    endpoint = constants.ENDPOINT
    try:
        HfApi(endpoint=endpoint).model_info(model, timeout=hub_check_timeout())
    except GatedRepoError:
        return
    except RepositoryNotFoundError:
        raise PreflightError(
            f"{where}: {model}: no such model on the Hub ({endpoint}), or it is private and no token "
            "with access is set (`hf auth login`); check the id, or give a local model folder"
        ) from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status is not None and status < 500:
            return  # 401/403 for a model that needs a token: the download says what is missing
        raise _unreachable(model, where, endpoint, f"it answered {status}") from None
    except Exception as e:  # noqa: BLE001 - no connection, a timeout, a proxy, DNS: all "cannot be reached"
        raise _unreachable(model, where, endpoint, _reason(e)) from None


def _reason(e: BaseException) -> str:
    text = (str(e).strip().splitlines() or [""])[0][:160]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _unreachable(model: str, where: str, endpoint: str, reason: str) -> PreflightError:
    return PreflightError(
        f"{where}: {model} is not in the Hugging Face cache and the Hub ({endpoint}) cannot be reached "
        f"({reason}); give a local model folder, or run where the Hub can be reached"
    )


# Files of a model folder whose `auto_map` makes transformers or vLLM import the folder's own code.
REMOTE_CODE_FILES = (
    "config.json",
    "processor_config.json",
    "preprocessor_config.json",
    "tokenizer_config.json",
)


def model_folder(model: str) -> Path | None:
    """The local folder of `model`: itself, or its snapshot in the Hugging Face cache; None if neither."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if not HUB_ID.match(model):
        return None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(model, "config.json")
    return Path(found).parent if isinstance(found, str) else None


def check_remote_code(model: str, trusted: bool, where: str, option: str) -> None:
    """A model folder that asks to run its own code (`auto_map`) is refused unless `option`
    (trust_remote_code) says so: its Python files would run with the user's rights. Never asked
    interactively: a prompt in the middle of a batch job is a hang, and one "y" runs the code."""
    if trusted or model == DEMO_MODEL:
        return
    folder = model_folder(model)
    for name in REMOTE_CODE_FILES if folder is not None else ():
        try:
            data = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        auto_map = data.get("auto_map") if isinstance(data, dict) else None
        if auto_map:
            classes = ", ".join(sorted(auto_map)) if isinstance(auto_map, dict) else str(auto_map)
            raise PreflightError(
                f"{where}: {model}: {name} asks to run the model folder's own Python code (auto_map: "
                f"{classes}); it runs only with {option}; set it only for a model whose code you trust"
            )


@lru_cache(maxsize=1)
def engine_options() -> frozenset[str] | None:
    """The keyword options `vllm.LLM` passes to `vllm.EngineArgs`: its dataclass fields, read from the
    installed vLLM's source without importing it. None when that source cannot be read (no check)."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    source = Path(spec.submodule_search_locations[0]) / "engine" / "arg_utils.py"
    try:
        tree = ast.parse(source.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "EngineArgs":
            names = {
                n.target.id
                for n in node.body
                if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
            }
            return frozenset(names) or None
    return None


def check_engine_options(options: dict, file: str) -> None:
    """Every key of the recipe's `engine:` is an option of `vllm.EngineArgs`, or one of the pipeline's
    own engine settings (engine.PIPELINE_ENGINE_KEYS)."""
    from mmpr_pipeline.engine import PIPELINE_ENGINE_KEYS

    threads = options.get("cpu_threads")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise PreflightError(f"{file}: engine.cpu_threads: {threads!r} is not a whole number of threads >= 1")
    known = engine_options()
    if known is None:
        return
    for key in options:
        if key not in known and key not in PIPELINE_ENGINE_KEYS:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise PreflightError(f"{file}: engine.{key}: not an option of vllm.EngineArgs{hint}")


def first_file_above(path: Path) -> Path | None:
    """The nearest existing ancestor of `path` when it is a file (no folder can be made under it)."""
    for parent in path.parents:
        if parent.exists():
            return parent if not parent.is_dir() else None
    return None


def check_writable_folder(out: str | Path, flag: str = "--out") -> None:
    """`out` is (or can be made as) a folder this process can write in."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PreflightError(f"{flag} {out}: is a file, not a folder")
    blocker = first_file_above(out)
    if blocker is not None:
        raise PreflightError(f"{flag} {out}: {blocker} is a file, so no folder can be made under it")
    existing = next(p for p in (out, *out.parents) if p.exists())
    try:  # os.access says yes to root on a read-only mount: ask the file system itself
        with tempfile.TemporaryFile(dir=existing, prefix=".mmpr-write-check."):
            pass
    except OSError as e:
        raise PreflightError(f"{flag} {out}: cannot write in {existing} ({e.strerror})") from None


def check_out_dir(out: str | Path, flag: str = "--out") -> None:
    """`out` is (or can be made as) a folder this process can write, and its recipe.json is readable.
    On object storage: its bucket exists (whether it takes writes shows at the build's lock object)."""
    out = storage.as_path(out)
    if isinstance(out, storage.ObjectPath):
        bucket = storage.split_url(out.url)[0]
        if not storage.ObjectPath(f"s3://{bucket}").is_dir():
            raise PreflightError(f"{flag} {out}: the bucket {bucket!r} does not exist")
    else:
        check_writable_folder(out, flag)
    recipe_file = out / "recipe.json"
    if recipe_file.exists():
        try:
            json.loads(recipe_file.read_text(encoding="utf-8"))
        except (ValueError, OSError) as e:
            raise PreflightError(
                f"{recipe_file}: cannot be read ({e}), so {out} cannot be resumed as a run "
                f"folder: use another {flag}"
            ) from None


def check_sources_give_questions(recipe: Recipe) -> None:
    """Each source gives at least one usable question; reading stops at the first one. A source whose
    every row is set aside (wrong `fields:`?) would otherwise end in an empty build with rc 0."""
    from mmpr_pipeline.sources import BadRow, SourceError, read_rows, to_question

    for i, source in enumerate(recipe.sources):
        reasons, n_rows = Counter(), 0
        try:
            for row_index, raw in enumerate(read_rows(source)):
                if source.limit is not None and row_index >= source.limit:
                    break
                n_rows += 1
                try:
                    to_question(raw, source, row_index)
                    break
                except BadRow as e:
                    reasons[str(e)] += 1
        except SourceError as e:
            raise SourceError(f"{recipe.file}: {e}") from None
        except Exception as e:  # noqa: BLE001 - as sources.scan_input does: name the source, not the library
            raise SourceError(
                f"{recipe.file}: source {source.name!r} ({source.loader}: "
                f"{source.path or source.dataset}) cannot be read: {type(e).__name__}: {e}"
            ) from None
        if n_rows == 0:
            raise PreflightError(
                f"{recipe.file}: sources[{i}] ({source.name}): gives no rows "
                f"({source.loader}: {source.path or source.dataset or source.generator})"
            )
        if n_rows == sum(reasons.values()):
            top = ", ".join(f"{r} ({n})" for r, n in reasons.most_common(3))
            raise PreflightError(
                f"{recipe.file}: sources[{i}] ({source.name}): none of its {n_rows} rows is "
                f"usable ({top}); check its fields:"
            )


def check_build(recipe: Recipe, out: str | Path, model_from_cli: bool) -> None:
    """Everything `mmpr build` / `mmpr eval` can check before starting Ray and vLLM."""
    check_out_dir(out)
    check_model(recipe.model, "--model" if model_from_cli else f"{recipe.file}: model")
    check_remote_code(
        recipe.model,
        recipe.trust_remote_code or bool(recipe.engine.get("trust_remote_code")),
        "--model" if model_from_cli else f"{recipe.file}: model",
        f"`trust_remote_code: true` in {recipe.file}",
    )
    check_engine_options(recipe.engine, recipe.file)
    if recipe.judge_modes():  # the judge model's engine too, before any engine starts
        from mmpr_pipeline.recipe import DEMO_JUDGE

        if recipe.judge_model.model != DEMO_JUDGE:
            check_model(recipe.judge_model.model, f"{recipe.file}: judge_model.model")
        check_engine_options(recipe.judge_model.engine, f"{recipe.file}: judge_model")
    check_sources_give_questions(recipe)
