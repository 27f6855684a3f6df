"""The demo model: training is deterministic, cached, atomic, and the prompt matches sampling time."""

import json

import pytest
import torch

from mmpr_pipeline import demo_examples, demo_model, prompts, tasks

SMALL = dict(steps=3, batch_size=4)  # seconds, not the real training


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_ensure_trained_trains_marks_and_caches(tmp_path, monkeypatch):
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    out = demo_model.ensure_trained(tmp_path / "demo", eval_n=4, **SMALL)
    assert out == tmp_path / "demo"
    marker = json.loads((out / demo_model.MARKER).read_text())
    assert marker["trained"] is True and marker["steps"] == 3
    assert marker["settings"]["batch_size"] == 4
    # 3 steps teach nothing: no held-out row ends in the right "Final answer:" line (one row per family)
    assert marker["heldout_accuracy"] == {"all": 0.0, "bars": 0.0, "color": 0.0, "compare": 0.0, "count": 0.0}
    model = Qwen2VLForConditionalGeneration.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    assert model.config.text_config.hidden_size == demo_model.SIZES["demo"]["hidden"]
    assert processor.tokenizer.eos_token == "<|im_end|>"
    assert not list(tmp_path.glob(".demo.*")), "temporary folders left behind"

    # A second call with the same settings returns at once, without training.
    def boom(*a, **k):
        raise AssertionError("retrained a model that was already trained")

    monkeypatch.setattr(demo_model, "train_demo", boom)
    before = (out / "model.safetensors").stat().st_mtime_ns
    assert demo_model.ensure_trained(out, **SMALL) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == before
    # Other settings (or force) mean the cached model is stale: it trains again.
    with pytest.raises(AssertionError, match="retrained"):
        demo_model.ensure_trained(out, steps=4, batch_size=4)
    with pytest.raises(AssertionError, match="retrained"):
        demo_model.ensure_trained(out, force=True, **SMALL)
    assert json.loads((out / demo_model.MARKER).read_text())["trained"] is True  # untouched by the failures


def test_training_is_deterministic(tmp_path):
    a = _weights(demo_model.train_demo(tmp_path / "a", seed=0, eval_n=0, **SMALL))
    b = _weights(demo_model.train_demo(tmp_path / "b", seed=0, eval_n=0, **SMALL))
    c = _weights(demo_model.train_demo(tmp_path / "c", seed=1, eval_n=0, **SMALL))
    built = _weights(demo_model.build(tmp_path / "untrained", size="demo", seed=0))
    assert a.keys() == b.keys() == built.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert any(not torch.equal(a[k], built[k]) for k in a), "training changed nothing"


def test_interrupted_training_leaves_no_finished_looking_folder(tmp_path, monkeypatch):
    def interrupted(out_dir, **kw):
        demo_model.build(out_dir, size="demo")
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_model, "train_demo", interrupted)
    with pytest.raises(KeyboardInterrupt):
        demo_model.ensure_trained(tmp_path / "demo", **SMALL)
    assert not (tmp_path / "demo").exists()
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_a_folder_that_is_not_a_demo_model(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a demo model"):
        demo_model.ensure_trained(tmp_path / "mine", **SMALL)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(TypeError, match="unknown training setting"):
        demo_model.ensure_trained(tmp_path / "x", stepz=3)


def test_training_prompt_is_the_sampling_prompt_and_loss_is_on_the_response_only(tmp_path):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(demo_model.build(tmp_path / "m", size="tiny"))
    rows = list(tasks.generate(5, seed=3, families=tasks.FAMILIES))
    batch = demo_examples.training_batch(processor, rows)
    tok = processor.tokenizer
    for i, row in enumerate(rows):
        ids, labels = batch["input_ids"][i], batch["labels"][i]
        answer_ids = ids[labels != -100]
        assert tok.decode(answer_ids) == row["response"] + "<|im_end|>"
        prompt = tok.decode(ids[: int((labels == -100).cumprod(0).sum())])
        want = tok.apply_chat_template(
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "image"},
                        {"type": "text", "text": prompts.render("cot_final_answer", row["question"])},
                    ],
                }
            ],
            tokenize=False,
            add_generation_prompt=True,
        )
        # the processor expands the one image placeholder to the image's tokens
        assert prompt.replace("<|image_pad|>", "") == want.replace("<|image_pad|>", "")
        assert prompt.endswith("<|im_start|>assistant\n")
        assert "Describe this image." in want or "Final answer:" in row["response"]
    assert batch["pixel_values"].shape[0] == 64 * len(rows)  # 112x112 -> 8x8 patches each


def test_final_answer_reads_only_the_last_line():
    assert demo_examples.final_answer("I count 3.\nFinal answer: 3") == "3"
    assert demo_examples.final_answer("Final answer: B.\n") == "B"
    assert demo_examples.final_answer("Final answer: 3\nmore text") is None
    assert demo_examples.final_answer("") is None


def test_the_demo_loop_base_is_partly_right_by_design():
    """The demo loop needs headroom: its base counts one kind of shape but is still unsure when it
    compares two counts (an under-trained policy, neither solved like the default demo model nor
    guessing from scratch)."""
    marker = json.loads((demo_model.ensure_loop_base() / demo_model.MARKER).read_text())
    assert marker["settings"] == demo_model._settings(steps=120) and marker["steps"] == 120
    acc = marker["heldout_accuracy"]  # greedy, 25 held-out rows per family
    assert acc["count"] >= 0.85  # the shipped base: 0.88 count, 0.56 compare
    assert 0.35 <= acc["compare"] <= 0.8


# The shipped weights (mmpr_pipeline/demo_assets/*/model.safetensors). `mmpr demo-model --rebuild`
# rewrites them; a change here changes the README's demo figures too, which must be re-measured.
SHIPPED_WEIGHTS_SHA256 = {
    "demo": "e551489a1ff3b9f2943a449a98f6da5b5d169853cca96c8bc5577636f4d111cc",
    "demo-loop-base": "ccc59381cbb5078d11e3e4a2e8b4f1cba5bee6cc06d11da4d7b988eb49296265",
}


def test_shipped_models_have_the_recorded_weights_and_settings():
    import hashlib

    assert set(demo_model.SHIPPED) == set(SHIPPED_WEIGHTS_SHA256)
    for name, settings in demo_model.SHIPPED.items():
        folder = demo_model.ASSETS_DIR / name
        demo_model.verify_checksums(folder)
        weights = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
        assert weights == SHIPPED_WEIGHTS_SHA256[name]
        assert demo_model.shipped_folder(demo_model._settings(**settings)) == folder
    # the defaults (what "model: demo" resolves to) and the loop's base are the shipped ones
    assert demo_model.ensure_trained() == demo_model.DEFAULT_DIR
    assert demo_model.file_hashes(demo_model.DEFAULT_DIR) == demo_model.file_hashes(
        demo_model.ASSETS_DIR / "demo"
    )


def test_ensure_trained_copies_the_shipped_model_and_never_trains_it(tmp_path, monkeypatch):
    import shutil

    def boom(*a, **k):
        raise AssertionError("trained a model that is shipped")

    monkeypatch.setattr(demo_model, "train_demo", boom)
    shipped = demo_model.ASSETS_DIR / "demo"
    out = demo_model.ensure_trained(tmp_path / "demo")
    assert demo_model.file_hashes(out) == demo_model.file_hashes(shipped)
    before = (out / "model.safetensors").stat().st_mtime_ns
    assert demo_model.ensure_trained(out) == out  # already the shipped files: untouched
    assert (out / "model.safetensors").stat().st_mtime_ns == before
    # a local copy that differs (trained on another machine, edited) is replaced by the shipped one
    weights = bytearray((out / "model.safetensors").read_bytes())
    weights[-1] ^= 1
    (out / "model.safetensors").write_bytes(bytes(weights))
    demo_model.ensure_trained(out)
    assert demo_model.file_hashes(out) == demo_model.file_hashes(shipped)
    # a shipped file that does not match its SHA256SUMS is refused, naming it
    assets = tmp_path / "assets"
    shutil.copytree(demo_model.ASSETS_DIR, assets)
    (assets / "demo" / "model.safetensors").write_bytes(bytes(weights))
    monkeypatch.setattr(demo_model, "ASSETS_DIR", assets)
    with pytest.raises(demo_model.DemoAssetError, match="model.safetensors: sha256"):
        demo_model.ensure_trained(tmp_path / "other")
    assert not (tmp_path / "other").exists()


def test_training_does_not_depend_on_the_callers_thread_count(tmp_path):
    """Trained on one thread whatever the caller's torch uses, so a rebuild gives the same weights on
    a machine with another core count."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        a = _weights(demo_model.train_demo(tmp_path / "a", seed=0, eval_n=0, **SMALL))
        torch.set_num_threads(1)
        b = _weights(demo_model.train_demo(tmp_path / "b", seed=0, eval_n=0, **SMALL))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a[k], b[k]) for k in a)
