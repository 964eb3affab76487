"""`cir score` and `cir validate-submission` on fixture files in the datasets' on-disk formats."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cli_run import run_main

VENV_CIR = Path(sys.executable).parent / "cir"
N = [f"dev-{i}-img0" for i in range(8)]


def _write(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def _cirr_entry(pairid, ref, target, members):
    return {"pairid": pairid, "reference": ref, "target_hard": target, "target_soft": {target: 1.0},
            "caption": "make it red", "img_set": {"id": pairid, "members": members,
                                                  "reference_rank": 0, "target_rank": 1}}


@pytest.fixture()
def cirr(tmp_path):
    root = tmp_path / "cirr"
    _write(root / "image_splits" / "split.rc2.val.json", {n: f"./dev/{n}.png" for n in N})
    _write(root / "captions" / "cap.rc2.val.json", [
        _cirr_entry(1, N[0], N[2], N[0:6]),
        _cirr_entry(2, N[1], N[5], N[1:7]),
    ])
    # q1: target at rank 1 of the full list, subset rank 2; q2: rank 7, subset rank 1
    recall = {"version": "rc2", "metric": "recall",
              "1": [N[2], N[1], N[3], N[4], N[5], N[6], N[7]],
              "2": [N[0], N[2], N[3], N[4], N[6], N[7], N[5]]}
    subset = {"version": "rc2", "metric": "recall_subset", "1": [N[3], N[2], N[1]], "2": [N[5], N[2], N[3]]}
    return root, _write(tmp_path / "r.json", recall), _write(tmp_path / "s.json", subset)


CIRR_EXPECTED = {"recall@1": 50.0, "recall@5": 50.0, "recall@10": 100.0, "recall@50": 100.0,
                 "recall_subset@1": 50.0, "recall_subset@2": 100.0, "recall_subset@3": 100.0,
                 "avg": 50.0}


def test_score_cirr(cirr, capsys):
    root, r, s = cirr
    code, out, _ = run_main(capsys=capsys, argv=["score", "--dataset", "cirr", "--root", str(root), "--predictions", str(r),
                                 "--subset-predictions", str(s)])
    assert code == 0
    metrics = json.loads(out)
    assert list(metrics) == list(CIRR_EXPECTED)
    assert metrics == pytest.approx(CIRR_EXPECTED)
    assert out.count("\n") == 1


def test_score_cirr_requires_subset_file(cirr, capsys):
    root, r, _ = cirr
    code, _, err = run_main(capsys=capsys, argv=["score", "--dataset", "cirr", "--root", str(root), "--predictions", str(r)])
    assert code == 2 and err.startswith("error: ") and "recall_subset" in err and err.count("\n") == 1


def test_score_missing_query_names_it(cirr, capsys, tmp_path):
    root, r, s = cirr
    obj = json.loads(r.read_text())
    del obj["2"]
    _write(r, obj)
    code, _, err = run_main(capsys=capsys, argv=["score", "--dataset", "cirr", "--root", str(root), "--predictions", str(r),
                                 "--subset-predictions", str(s)])
    assert code == 2 and "1 query id(s) missing (first: 2)" in err and err.count("\n") == 1


@pytest.mark.parametrize("content, needle", [
    ("{oops", "malformed CIRR prediction file"),
    ('{"version": "rc2", "metric": "recall", "1": "x"}', "query 1: expected a list, got str"),
    ('["a"]', "must be a JSON object"),
])
def test_score_bad_prediction_files(cirr, capsys, tmp_path, content, needle):
    root, _, s = cirr
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    code, out, err = run_main(capsys=capsys, argv=["score", "--dataset", "cirr", "--root", str(root), "--predictions", str(bad),
                                   "--subset-predictions", str(s)])
    assert code == 2 and out == "" and needle in err and str(bad) in err and err.count("\n") == 1


def test_validate_submission_cirr(cirr, capsys):
    root, r, s = cirr
    # val is the only split on disk, so it is picked without --split; files in any order
    code, out, _ = run_main(capsys=capsys, argv=["validate-submission", "--dataset", "cirr", "--root", str(root), str(s), str(r)])
    assert code == 0 and out.startswith("OK: ") and "cirr val" in out
    obj = json.loads(r.read_text())
    obj["1"] = obj["1"][:5] + [obj["1"][0]]
    obj["3"] = obj["2"]
    _write(r, obj)
    code, out, _ = run_main(capsys=capsys, argv=["validate-submission", "--dataset", "cirr", "--root", str(root), "--split", "val",
                                 str(r), str(s)])
    lines = out.strip().splitlines()
    assert code == 2
    assert any("query 1: expected 7 entries, got 6" in ln for ln in lines)
    assert any("query 1: duplicate entries" in ln for ln in lines)
    assert any("not query ids (first: 3)" in ln for ln in lines)
    assert lines[-1].startswith("INVALID: 3 problem(s)")


def test_validate_submission_picks_split_by_ids(cirr, capsys):
    root, r, s = cirr
    # a test1 split on disk with other pairids: the val file is still checked against val
    _write(root / "image_splits" / "split.rc2.test1.json", {n: f"./test1/{n}.png" for n in N})
    entry = _cirr_entry(50, N[0], N[1], N[0:6])
    del entry["target_hard"]
    _write(root / "captions" / "cap.rc2.test1.json", [entry])
    code, out, _ = run_main(capsys=capsys, argv=["validate-submission", "--dataset", "cirr", "--root", str(root), str(r), str(s)])
    assert code == 0 and "cirr val" in out


# ----------------------------------------------------------------------------- FashionIQ

@pytest.fixture()
def fashioniq(tmp_path):
    root = tmp_path / "fiq"
    preds = {}
    # dress: targets at ranks 1 and 11; shirt: rank 12; toptee: rank 3
    ranks = {"dress": [1, 11], "shirt": [12], "toptee": [3]}
    for cat, rs in ranks.items():
        names = [f"{cat}{i:02d}" for i in range(12)]
        _write(root / "image_splits" / f"split.{cat}.val.json", names)
        entries = []
        for qi, rank in enumerate(rs):
            target = names[rank - 1]
            entries.append({"target": target, "candidate": names[(rank) % 12], "captions": ["is red", "has dots"]})
            preds[f"{cat}/{qi}"] = names
        _write(root / "captions" / f"cap.{cat}.val.json", entries)
    return root, _write(tmp_path / "fiq.json", preds)


def test_score_fashioniq(fashioniq, capsys):
    root, p = fashioniq
    code, out, _ = run_main(capsys=capsys, argv=["score", "--dataset", "fashioniq", "--root", str(root), "--predictions", str(p)])
    assert code == 0
    metrics = json.loads(out)
    expected = {"dress_recall@10": 50.0, "dress_recall@50": 100.0, "shirt_recall@10": 0.0, "shirt_recall@50": 100.0,
                "toptee_recall@10": 100.0, "toptee_recall@50": 100.0,
                "avg_recall@10": 50.0, "avg_recall@50": 100.0, "avg": 75.0}
    assert list(metrics) == list(expected) and metrics == pytest.approx(expected)


def test_score_fashioniq_missing_category(fashioniq, capsys):
    root, p = fashioniq
    obj = {k: v for k, v in json.loads(p.read_text()).items() if not k.startswith("toptee/")}
    _write(p, obj)
    code, _, err = run_main(capsys=capsys, argv=["score", "--dataset", "fashioniq", "--root", str(root), "--predictions", str(p)])
    assert code == 2 and "missing (first: toptee/0)" in err and err.count("\n") == 1


# ----------------------------------------------------------------------------- CIRCO

@pytest.fixture()
def circo(tmp_path):
    root = tmp_path / "circo"
    ann = [
        {"id": 0, "reference_img_id": 5, "relative_caption": "is blue", "shared_concept": "a dog",
         "target_img_id": 11, "gt_img_ids": [11, 12], "semantic_aspects": []},
        {"id": 1, "reference_img_id": 6, "relative_caption": "two of them", "shared_concept": "a cat",
         "target_img_id": 21, "gt_img_ids": [21], "semantic_aspects": ["cardinality"]},
    ]
    _write(root / "annotations" / "val.json", ann)
    filler = [1000 + i for i in range(60)]
    # q0: gts at ranks 1 and 3; q1: its one gt at rank 7
    preds = {"0": [11, 99, 12] + filler[:47], "1": filler[:6] + [21] + filler[6:49]}
    return root, _write(tmp_path / "circo.json", preds)


def test_score_circo(circo, capsys):
    root, p = circo
    code, out, _ = run_main(capsys=capsys, argv=["score", "--dataset", "circo", "--root", str(root), "--predictions", str(p),
                                 "--circo-shared-concept"])
    assert code == 0
    metrics = json.loads(out)
    ap0 = (1 + 2 / 3) / 2                 # both gts within every K
    ap1_5, ap1 = 0.0, 1 / 7
    assert list(metrics) == ["map@5", "map@10", "map@25", "map@50"]
    assert metrics == pytest.approx({"map@5": 100 * (ap0 + ap1_5) / 2, "map@10": 100 * (ap0 + ap1) / 2,
                                     "map@25": 100 * (ap0 + ap1) / 2, "map@50": 100 * (ap0 + ap1) / 2})


def test_validate_submission_circo(circo, capsys):
    root, p = circo
    code, out, _ = run_main(capsys=capsys, argv=["validate-submission", "--dataset", "circo", "--root", str(root), str(p)])
    assert code == 0 and out.startswith("OK: ")
    obj = json.loads(p.read_text())
    obj["0"] = obj["0"][:49] + [obj["0"][0]]
    _write(p, obj)
    code, out, _ = run_main(capsys=capsys, argv=["validate-submission", "--dataset", "circo", "--root", str(root), str(p)])
    assert code == 2 and "circo query 0: duplicate entries 11" in out


def test_cli_subprocess_score_and_error(circo, tmp_path):
    root, p = circo
    cmd = [str(VENV_CIR), "score", "--dataset", "circo", "--root", str(root), "--predictions", str(p)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert set(json.loads(res.stdout)) == {"map@5", "map@10", "map@25", "map@50"}
    bad = _write(tmp_path / "bad.json", {"0": [1, 2]})
    res = subprocess.run(cmd[:-1] + [str(bad)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1 and "missing (first: 1)" in res.stderr
