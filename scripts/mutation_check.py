"""A small mutation check: the bugs that would ruin a dataset or a model must fail the tests.

    python scripts/mutation_check.py [--list] [--only NAME]

Each mutant is one textual change to one file (the original must occur exactly once). For each,
the tracked files are copied to a scratch folder, the change is applied there, and the tests that
guard it run against the copy (`python -m pytest` from the copy, so the copy's code is the one
imported). The same tests first run once on an unmutated copy and must pass; a mutant is *killed*
when they then fail. Prints each result and the kill rate, and
exits 1 if any mutant survives, so CI (`make mutation`, run by .ci/run) catches a test that stopped
guarding its code. The trained demo model is shared with the copy (build/ is linked, not copied).
Test runs go two at a time (`--jobs`). Each mutant names the cheapest test that kills it; where the
suite also has a slower end-to-end check of the same bug (the trainer's, on real runs), that one is
listed in the test's docstring, not run here.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Mutant:
    name: str
    file: str
    old: str
    new: str
    tests: list[str]


MUTANTS = [
    Mutant(
        "pair: chosen and rejected swapped",
        "stages/pair.py",
        "chosen=reference if c == REFERENCE else texts[c],\n                rejected=texts[r],",
        "chosen=texts[r],\n                rejected=reference if c == REFERENCE else texts[c],",
        ["tests/test_pairing.py"],
    ),
    Mutant(
        "pairing: a wrong response counted as right",
        "mmpr_pipeline/pairing.py",
        "right = [i for i in judged if correct[i]]",
        "right = [i for i in judged if not correct[i]]",
        ["tests/test_pairing.py"],
    ),
    Mutant(
        "pairing: unparsable responses as wrong answers",
        "mmpr_pipeline/pairing.py",
        "if not correct[i] and extracted[i] is not None]",
        "if not correct[i] and extracted[i] is None]",
        ["tests/test_pairing.py"],
    ),
    Mutant(
        "dropout: min_words boundary < -> <=",
        "mmpr_pipeline/pairing.py",
        "if len(words) < min_words or keep < 1",
        "if len(words) <= min_words or keep < 1",
        ["tests/test_dropout_truncate.py"],
    ),
    Mutant(
        "judge: relaxed (chart) tolerance sign flipped",
        "mmpr_pipeline/scoring/answer_numbers.py",
        "abs(p - g) <= abs(g) * Fraction(tolerance)",
        "abs(p - g) >= abs(g) * Fraction(tolerance)",
        ["tests/test_scoring.py", "-k", "number_equivalence or chart_relaxed"],
    ),
    Mutant(
        "judge: rounding tolerance sign flipped",
        "mmpr_pipeline/scoring/answer_numbers.py",
        "abs(p - g) <= Fraction(1, 2 * 10**decimals)",
        "abs(p - g) >= Fraction(1, 2 * 10**decimals)",
        ["tests/test_scoring.py", "-k", "number_equivalence or chart_relaxed"],
    ),
    Mutant(
        "trainer: chosen and rejected swapped in the mpo_loss call",
        "mmpr_pipeline/train/step.py",
        "logps[:n],\n        logps[n:],\n        ref_logps[:n],\n        ref_logps[n:],",
        "logps[n:],\n        logps[:n],\n        ref_logps[n:],\n        ref_logps[:n],",
        ["tests/test_train_loop.py", "-k", "raises_held_out"],
    ),
    Mutant(
        "trainer: SFT averaged per sequence, not per token",
        "mmpr_pipeline/train/step.py",
        "chosen_nll = -logps[:n].sum() / denominator",
        "chosen_nll = -(logps[:n] / n_tokens[:n].clamp(min=1)).mean()",
        ["tests/test_train_trl.py", "-k", "each_mpo_term"],
    ),
    Mutant(
        "dropout: chosen and rejected swapped",
        "mmpr_pipeline/pairing.py",
        "chosen=text,\n                rejected=prefix + continuation,",
        "chosen=prefix + continuation,\n                rejected=text,",
        ["tests/test_dropout_truncate.py"],
    ),
    Mutant(
        "dropout: the continuation always sees the images (with_image forced on)",
        "stages/dropout_ntp.py",
        "conversation(row, cfg.with_image, background)",
        "conversation(row, True, background)",
        ["tests/test_dropout_with_image.py", "-k", "request_holds_the_images"],
    ),
    Mutant(
        "trainer: LoRA reference is the adapted policy (adapters not disabled)",
        "mmpr_pipeline/train/reference.py",
        "        with policy_of(model).disable_adapter():  # LoRA: the base model is the reference\n"
        "            return response_logps(model, batch)[0]",
        "        return response_logps(model, batch)[0]",
        ["tests/test_train_reference.py"],
    ),
    Mutant(
        "trainer: live reference is the policy itself, not a frozen copy",
        "mmpr_pipeline/train/reference.py",
        "ref_model = copy.deepcopy(model).eval().requires_grad_(False)",
        "ref_model = model",
        ["tests/test_train_reference.py"],
    ),
    Mutant(
        "trainer: warm-up never applied",
        "mmpr_pipeline/train/step.py",
        "    if step < warmup:\n",
        "    if step < 0:\n",
        ["tests/test_train_reference.py"],
    ),
    Mutant(
        "trainer: running-mean delta fed reference minus policy",
        "mmpr_pipeline/train/step.py",
        "mean_reward = cfg.beta * (logps.detach() - ref_logps).mean()",
        "mean_reward = cfg.beta * (ref_logps - logps.detach()).mean()",
        ["tests/test_train_reference.py"],
    ),
    Mutant(
        "qid: a multi-image question hashes only its first image",
        "mmpr_pipeline/records.py",
        "stable_hash(*images, length=64)",
        "stable_hash(*images[:1], length=64)",
        ["tests/test_unit_keys.py"],
    ),
    Mutant(
        "resume: a counts file of another plan or other rows counts as done",
        "mmpr_pipeline/units.py",
        'json.loads(path.read_text()).get("key") == unit.key',
        'json.loads(path.read_text()).get("key") is not None',
        ["tests/test_unit_keys.py"],
    ),
    Mutant(
        "resume: a unit's key ignores its rows' content",
        "mmpr_pipeline/units.py",
        "            self.qids_digest,\n",
        "",
        ["tests/test_unit_keys.py"],
    ),
    Mutant(
        "engine: a replica's placement group may span nodes (PACK, not STRICT_PACK)",
        "mmpr_pipeline/engine.py",
        'pg = placement_group(plan.bundles, strategy="STRICT_PACK")',
        'pg = placement_group(plan.bundles, strategy="PACK")',
        ["tests/test_cluster.py", "-k", "replica_plan_rules"],
    ),
    Mutant(
        "image: only RGBA is composited on white (LA, palette and tRNS images go black)",
        "mmpr_pipeline/records.py",
        '    if _has_transparency(img):\n        rgba = img.convert("RGBA")',
        '    if img.mode == "RGBA":\n        rgba = img.convert("RGBA")',
        ["tests/test_image_decode.py", "-k", "independent_rendering"],
    ),
    Mutant(
        "image: the EXIF orientation is ignored (phone photos sideways for the trainer)",
        "mmpr_pipeline/records.py",
        "    if _orientation(img) != 1:\n        img = ImageOps.exif_transpose(img)",
        "    if False:\n        img = ImageOps.exif_transpose(img)",
        ["tests/test_image_decode.py", "-k", "independent_rendering"],
    ),
    Mutant(
        "judge: option labels past Z are not options",
        "mmpr_pipeline/scoring/modes.py",
        "if m and (len(m.group(1)) == 1 or m.group(1).upper() in labels):",
        "if m and len(m.group(1)) == 1:",
        ["tests/test_answers_as_written.py", "-k", "past_option_26"],
    ),
    Mutant(
        "pair: a pair whose chosen and rejected are the same text is kept",
        "stages/pair.py",
        '        if same_text(p["chosen"], p["rejected"]):',
        "        if False:",
        ["tests/test_answers_as_written.py", "-k", "same_text_pairs_are_counted"],
    ),
    Mutant(
        "math: every bare symbol equals every other (E == d)",
        "mmpr_pipeline/scoring/_math_server.py",
        "and not isinstance(e, (Eq, Symbol))",
        "and not isinstance(e, Eq)",
        ["tests/test_rules_undecided.py", "-k", "math_letters_and_constants"],
    ),
    Mutant(
        "decontamination: a cropped benchmark copy is not indexed by its crops",
        "mmpr_pipeline/decontam.py",
        "CROPS = tuple(",
        "CROPS = () and tuple(",
        ["tests/test_decontaminate.py", "-k", "edited_copies_match"],
    ),
]


def copy_repo(dest: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    for f in files:
        src = REPO / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    if (REPO / "build").exists():
        os.symlink(REPO / "build", dest / "build")


def pytest(root: Path, tests: list[str]) -> tuple[int, float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
        cwd=root,
        capture_output=True,
        text=True,
    )
    return proc.returncode, time.perf_counter() - t0, (proc.stdout.strip().splitlines() or [""])[-1]


def run(mutant: Mutant) -> tuple[bool, float, str]:
    with tempfile.TemporaryDirectory(prefix="mutant-") as tmp:
        root = Path(tmp)
        copy_repo(root)
        path = root / mutant.file
        text = path.read_text()
        if text.count(mutant.old) != 1:
            return (
                False,
                0.0,
                f"the original text occurs {text.count(mutant.old)} times in {mutant.file}: "
                "update the mutant",
            )
        path.write_text(text.replace(mutant.old, mutant.new))
        rc, seconds, tail = pytest(root, mutant.tests)
        return rc == 1, seconds, tail  # 1: tests failed (2+ would be an error of the run itself)


def baseline(mutants: list[Mutant], jobs: int) -> list[str]:
    """Every guarding test set passes on the unmutated copy: a kill then means the mutant failed it."""
    with tempfile.TemporaryDirectory(prefix="baseline-") as tmp:
        copy_repo(Path(tmp))
        sets = list(dict.fromkeys(tuple(m.tests) for m in mutants))
        with ThreadPoolExecutor(jobs) as pool:
            results = pool.map(lambda tests: pytest(Path(tmp), list(tests)), sets)
            return [f"{' '.join(t)}: {tail}" for t, (rc, _, tail) in zip(sets, results) if rc != 0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--only", default=None, help="run the mutants whose name contains this")
    # Each test run is one mostly single-threaded process: two at once on CI's 2 cores.
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="test runs at once")
    args = ap.parse_args()
    mutants = [m for m in MUTANTS if not args.only or args.only in m.name]
    if args.list:
        for m in mutants:
            print(f"{m.name}: {m.file} ({' '.join(m.tests)})")
        return 0
    t0 = time.perf_counter()
    failing = baseline(mutants, args.jobs)
    if failing:
        print("the guarding tests fail without any mutant:\n  " + "\n  ".join(failing))
        return 1
    print(f"baseline: every guarding test set passes unmutated [{time.perf_counter() - t0:.0f}s]", flush=True)
    killed = 0
    with ThreadPoolExecutor(args.jobs) as pool:
        for m, (dead, seconds, tail) in zip(mutants, pool.map(run, mutants)):
            killed += dead
            print(f"{'killed  ' if dead else 'SURVIVED'} {m.name} [{seconds:.0f}s] {tail}", flush=True)
    print(
        f"mutation check: {killed} of {len(mutants)} mutants killed ({killed / len(mutants):.0%}) "
        f"in {time.perf_counter() - t0:.0f}s"
    )
    return 0 if killed == len(mutants) else 1


if __name__ == "__main__":
    sys.exit(main())
