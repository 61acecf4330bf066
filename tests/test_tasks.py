"""Task generator: determinism, exact verifiers, disjoint splits, judge balance, noisy set."""

import random
from collections import Counter

import pytest

from slimforge import SlimforgeError
from slimforge.io import write_jsonl
from slimforge.tasks import (FAMILIES, corrupt, is_correct, load_records, numeric_reward, split_of)
from slimforge.tasks.families import sample_problems
from slimforge.tasks.judge import VERDICTS
from tests.conftest import small_suite


def _value(prompt: str) -> int:
    """Hand-evaluate an arithmetic prompt like '12+34-5=' (digits and + - * only)."""
    expr = prompt.rstrip("=")
    assert set(expr) <= set("0123456789+-*"), prompt
    return eval(expr)  # safe: checked to be digits and operators only


def test_same_seed_same_files_other_seed_differs():
    a, la = small_suite(seed=0)
    b, lb = small_suite(seed=0)
    c, _ = small_suite(seed=1)
    assert a == b and la == lb
    assert a["train.jsonl"] != c["train.jsonl"]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_answers_are_exact(family):
    rng = random.Random(0)
    for prompt, value in sample_problems(family, "train", 200, rng, unique=False):
        assert _value(prompt) == value
        assert value >= 0 or family == "chain"


def test_splits_are_disjoint_and_stable():
    files, _ = small_suite()
    train = {r["prompt"] for r in files["train.jsonl"]}
    test = {r["prompt"] for r in files["test.jsonl"]}
    val = {r["prompt"] for r in files["val.jsonl"]}
    assert train and test and val
    assert not train & test and not train & val and not test & val
    assert all(split_of(p) == "test" for p in test)
    assert split_of("12+34=") == split_of("12+34=")


def test_verifiers():
    assert is_correct("46", " 46 ") and not is_correct("46", "47") and not is_correct("46", "4 6")
    assert numeric_reward("-3", "the answer is -3.") == 1.0
    assert numeric_reward("34", "35") == 0.0 and numeric_reward("34", "no number") == 0.0


def test_corrupt_is_wrong_and_non_negative():
    rng = random.Random(0)
    for value in list(range(0, 200)) + [999, 1998]:
        wrong = corrupt(value, rng)
        assert wrong != value and wrong >= 0


def test_judge_items_have_equal_exposure_and_balanced_verdicts():
    files, _ = small_suite()
    items = files["judge_train.jsonl"]
    formats = Counter(r["format"] for r in items)
    assert formats["verify"] == formats["pairwise"] == len(items) // 2
    verdicts = Counter(r["response"] for r in items)
    for fmt, (pos, neg) in VERDICTS.items():
        share = verdicts[pos] / (verdicts[pos] + verdicts[neg])
        assert 0.35 < share < 0.65, (fmt, verdicts)


def test_held_out_family_appears_only_inside_judge_prompts():
    """judge_families may name add3: the base then sees add3 in judge items (both formats), never as a
    problem it is trained to answer; the default keeps judge items on the base families."""
    from slimforge.tasks.suite import build_suite
    files, _ = build_suite(seed=0, n_train={"add": 50, "sub": 50, "mul": 50}, n_val=5, n_test=5, n_judge_train=400,
                           n_judge_test=40, n_lora=(5, 5, 5), n_rl=(5, 5, 5), noisy_families=("add3",), n_noisy=10,
                           wrong_fraction=0.3, n_references=10, judge_families=("add", "add3"))
    fams = Counter((r["family"], r["format"]) for r in files["judge_train.jsonl"])
    assert set(fams) == {(f"judge_{fmt}_{fam}", fmt) for fam in ("add", "add3") for fmt in ("verify", "pairwise")}
    assert fams[("judge_verify_add3", "verify")] == fams[("judge_pairwise_add3", "pairwise")] == 100
    assert all(r["family"] in ("add", "sub", "mul") for r in files["train.jsonl"])
    default, _ = small_suite()
    assert {r["family"].split("_")[-1] for r in default["judge_train.jsonl"]} == {"add", "sub", "mul"}


def test_judge_verdicts_are_right():
    """The verdict in every judge item agrees with recomputing the arithmetic it shows."""
    files, _ = small_suite()
    for r in files["judge_test.jsonl"]:
        lines = r["prompt"].split("\n")
        if r["format"] == "verify":
            q, a = lines[1].split("=")
            assert (r["response"] == " yes") == (_value(q + "=") == int(a))
        else:
            first_ok = _value(lines[1][3:].split("=")[0] + "=") == int(lines[1].split("=")[1])
            assert (r["response"] == " A") == first_ok


def test_noisy_set_hides_answers_and_labels_match():
    files, labels = small_suite()
    noisy = files["noisy.jsonl"]
    assert all("answer" not in r and "correct" not in r for r in noisy)
    assert [r["id"] for r in noisy] == [l["id"] for l in labels]
    for rec, lab in zip(noisy, labels):
        assert lab["correct"] == (_value(rec["prompt"]) == int(rec["response"]))
    wrong = sum(not l["correct"] for l in labels) / len(labels)
    assert 0.15 < wrong < 0.45
    refs = files["references.jsonl"]
    assert {r["correct"] for r in refs} == {True, False}
    assert not {r["prompt"] for r in refs} & {r["prompt"] for r in noisy}


def test_user_jsonl_schema(tmp_path):
    good = tmp_path / "good.jsonl"
    write_jsonl(good, [{"prompt": "2+2=", "response": "4", "answer": "4"}])
    assert load_records(good, need_answer=True)[0]["family"] == "user"
    with pytest.raises(SlimforgeError, match=r"good.jsonl:1: missing field\(s\) answer"):
        write_jsonl(good, [{"prompt": "2+2=", "response": "4"}])
        load_records(good, need_answer=True)


BAD_LINES = [  # (second line of the file, the error it must give)
    (b'{"prompt": 3, "response": "x"}', r"bad.jsonl:2: field 'prompt' must be str"),
    (b'{"prompt": ', r"bad.jsonl:2: not valid JSON"),
    (b'{"prompt": "caf\xe9", "response": "x"}', r"bad.jsonl:2: not UTF-8 text \(byte 0xe9 at column 16\)"),
    (b'{"prompt": "2+2=", "response": "4", "family": null}', r"bad.jsonl:2: field 'family' must be str, got null"),
    (b'{"prompt": "2+2=", "response": "4", "correct": 1}', r"bad.jsonl:2: field 'correct' must be bool, got int"),
]


@pytest.mark.parametrize("line,error", BAD_LINES)
def test_a_bad_line_names_the_file_line_and_field(tmp_path, line, error):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "1+1=", "response": "2"}\n' + line + b"\n")
    with pytest.raises(SlimforgeError, match=error):
        load_records(bad)


def test_check_data_reports_bad_bytes_in_one_line(tmp_path):
    import subprocess
    import sys

    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"prompt": "\xff", "response": "x"}\n')
    proc = subprocess.run([sys.executable, "-m", "slimforge.cli", "check-data", str(latin)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"error: {latin}:1: not UTF-8 text (byte 0xff at column 13); save the file as UTF-8"


def test_data_stage_checks_user_files_before_any_work(tmp_path, monkeypatch):
    import stages.data.stage as stage
    from slimforge.config import parse_params
    from stages.data.params import DataParams

    def no_work(*a, **k):
        raise AssertionError("the suite was built before the user's file was checked")

    monkeypatch.setattr(stage, "build_suite", no_work)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "user_data").mkdir()
    (tmp_path / "user_data" / "mine.jsonl").write_text('{"prompt": "1+1=", "response": "2", "answer": "2"}\n'
                                                       '{"prompt": "2+2=", "response": "4", "answer": "4", "family": null}\n')
    params = parse_params({"user_files": {"test.jsonl": "user_data/mine.jsonl"}}, DataParams, "d.yaml")
    with pytest.raises(SlimforgeError, match=r"user_data/mine.jsonl:2: field 'family' must be str, got null"):
        stage.run(params, tmp_path / "tasks", tmp_path / "labels", tmp_path / "m.json")
    assert not (tmp_path / "tasks").exists() and not (tmp_path / "m.json").exists()


def test_systematic_error_modes_give_the_intended_wrong_answers():
    from slimforge.tasks.families import systematic_answer

    assert systematic_answer("457+368=", 825, "no_carry") == 715  # 4+3, 5+6 -> 1, 7+8 -> 5: carries dropped
    assert systematic_answer("52-38=", 14, "no_carry") == 24      # 5-3, 2-8 -> 4: borrow dropped
    assert systematic_answer("457+368=", 825, "wrong_op") == 89   # the difference for a sum
    assert systematic_answer("52-38=", 14, "wrong_op") == 90      # the sum for a difference
    assert systematic_answer("7*12=", 84, "wrong_op") == 19
    assert systematic_answer("123+456=", 579, "no_carry") is None  # no carry: the mode is right here
    assert systematic_answer("7*12=", 84, "no_carry") is None
    assert systematic_answer("7*12=", 84, "random") is None


def test_noisy_set_with_error_modes_is_wrong_in_those_ways():
    from slimforge.tasks.families import systematic_answer
    from slimforge.tasks.suite import noisy_records

    rows, labels = noisy_records(("add3",), 400, 0.5, 0.5, random.Random(0), {"no_carry": 1.0})
    wrong = [(r, _value(r["prompt"])) for r, lab in zip(rows, labels) if not lab["correct"]]
    assert all(int(r["response"]) != v for r, v in wrong)
    by_rule = sum(int(r["response"]) == systematic_answer(r["prompt"], v, "no_carry") for r, v in wrong)
    assert by_rule / len(wrong) > 0.8  # the rest: problems without a carry, which fall back to a random slip
    default, _ = noisy_records(("add3",), 50, 0.5, 0.5, random.Random(0))
    again, _ = noisy_records(("add3",), 50, 0.5, 0.5, random.Random(0), None)
    assert default == again  # no error modes: no extra random draw, the default files are unchanged


def test_unknown_error_mode_is_refused_naming_the_allowed_ones():
    from slimforge.config import parse_params
    from stages.data.params import DataParams

    with pytest.raises(SlimforgeError, match=r"noisy.error_modes: .*shares >= 0 \(not all 0\) of random, no_carry, "
                                             r"wrong_op; got \{'typo': 1.0\}"):
        parse_params({"noisy": {"error_modes": {"typo": 1.0}}}, DataParams, "params/data.yaml")
