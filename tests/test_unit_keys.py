"""A unit's key names its plan and its rows' content; a unit is done only under its own key."""

import json

from mmpr_pipeline.records import question_id
from mmpr_pipeline.units import WorkUnit, counts_file, is_done, plan_source


class _Source:
    name, limit = "src", None


def _scans(*sizes):
    return [dict(path=f"f{i}", qids=[f"{i}-{k}" for k in range(n)], offsets=[]) for i, n in enumerate(sizes)]


def test_a_row_edited_in_place_changes_only_its_units_key():
    scans = _scans(6, 4)
    before = plan_source(_Source(), scans, unit_size=2)
    scans[0]["qids"][3] = "0-3 edited"  # same row count, other content: only unit 1 holds row 3
    after = plan_source(_Source(), scans, unit_size=2)
    assert [(u.path, u.start, u.stop) for u in after] == [(u.path, u.start, u.stop) for u in before]
    changed = [u.unit for u, v in zip(before, after) if u.key != v.key]
    assert changed == [1]
    scans[0]["qids"][3] = None  # the row became unreadable: a bad row is content too
    assert [u.unit for u, v in zip(before, plan_source(_Source(), scans, 2)) if u.key != v.key] == [1]


def test_is_done_only_for_a_counts_file_of_the_same_key(tmp_path):
    unit = plan_source(_Source(), _scans(4), unit_size=2)[1]
    other = WorkUnit(unit.source, unit.unit, unit.path, unit.start, unit.stop, unit.first_row)  # no digest
    assert other.key != unit.key
    path = counts_file(tmp_path, unit)
    assert not is_done(tmp_path, unit)  # no counts file
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    assert not is_done(tmp_path, unit)
    path.write_text(json.dumps({"key": other.key}))
    assert not is_done(tmp_path, unit)  # finished, but under another plan or other rows
    assert is_done(tmp_path, other)
    path.write_text(json.dumps({"key": unit.key}))
    assert is_done(tmp_path, unit) and not is_done(tmp_path, other)


def test_a_multi_image_qid_covers_every_image_in_order():
    a, b, c = b"image a", b"image b", b"image c"
    ids = {question_id("src", imgs, "Which is larger?", "A") for imgs in ([a, b], [a, c], [b, a])}
    assert len(ids) == 3  # two rows sharing the first image and the question are not duplicates
    # one image hashes as its bytes, as a single-image question's id always has
    assert question_id("src", [a], "Q", "1") == question_id("src", a, "Q", "1")
    assert question_id("src", [a, b], "Q", "1") == question_id("src", [a, b], "Q", "1")


def test_rows_sharing_only_their_first_image_are_not_duplicates(tmp_path):
    import io
    import json

    from PIL import Image

    from mmpr_pipeline.recipe import Source
    from stages.load import load_source

    for name, colour in (("a", "red"), ("b", "green"), ("c", "blue")):
        img = Image.new("RGB", (32, 32), colour)
        img.putpixel((0, 0), (0, 0, 0))  # not one flat colour (a blank image is set aside)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        (tmp_path / f"{name}.png").write_bytes(buf.getvalue())
    rows = [["a.png", "b.png"], ["a.png", "c.png"], ["b.png", "a.png"], ["a.png", "b.png"]]
    (tmp_path / "rows.jsonl").write_text(
        "".join(json.dumps(dict(image=r, question="Which is larger?", answer="3")) + "\n" for r in rows)
    )
    src = Source(name="src", loader="jsonl", path=str(tmp_path / "rows.jsonl"), answer_type="number")
    questions, rejects, _ = load_source(src, unit_size=2)
    assert [q["row_index"] for q in questions] == [0, 1, 2]  # only the exact repeat is one
    assert [(r["row_index"], r["reason"]) for r in rejects] == [(3, "duplicate of an earlier row")]
