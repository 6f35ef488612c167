"""Data layer: task generators and checkers, R1 format, tokenizer (incl. transformers parity), packing."""

import json
import random
import re
import time
from collections import Counter

import pytest
import torch

from nanoseek.data import (IGNORE_INDEX, TASKS, BatchIterator, Example, PackedDataset, Tokenizer, build_datasets,
                           check, collate, countdown_check, default_corpus, document_causal_mask, eval_batches,
                           extract_answer, format_ok, generate, load_documents, natural_paragraphs, r1_completion,
                           r1_document, r1_messages, r1_prompt, split_documents, tokenize_documents,
                           train_tokenizer)
from nanoseek.data.corpus import drill_documents, solution_steps
from nanoseek.data.tasks import countdown, expr, get_task
from nanoseek.data.tasks.countdown import search_trace

ALL_LEVELS = [(name, level) for name, spec in sorted(TASKS.items()) for level in spec.levels]


# ----------------------------------------------------------------------------------------- tasks

@pytest.mark.parametrize("task", sorted(TASKS))
def test_generate_is_deterministic_and_extends(task):
    a = generate(task, "train", 40, seed=3)
    assert a == generate(task, "train", 40, seed=3)
    assert a[:10] == generate(task, "train", 10, seed=3)  # a larger n extends a smaller one
    assert a != generate(task, "train", 40, seed=4)
    assert {e.difficulty for e in a} == set(TASKS[task].levels)  # difficulty=None mixes every level
    assert all(e.task == task and e.question and e.answer and e.solution for e in a)


@pytest.mark.parametrize("task,level", ALL_LEVELS)
def test_train_and_test_are_disjoint(task, level):
    key = get_task(task).key
    train = generate(task, "train", 300, level, seed=0) + generate(task, "train", 300, level, seed=1)
    test = generate(task, "test", 60, level, seed=0)
    assert len({key(e) for e in test}) == len(test)  # no repeats inside a split
    assert not {key(e) for e in train} & {key(e) for e in test}
    assert not {e.question for e in train} & {e.question for e in test}
    assert all(e.difficulty == level for e in test)


def test_generate_rejects_bad_arguments():
    with pytest.raises(KeyError, match="known tasks"):
        generate("nope", "train", 1)
    with pytest.raises(ValueError, match="split"):
        generate("arithmetic", "validation", 1)
    with pytest.raises(ValueError, match="difficulty"):
        generate("arithmetic", "train", 1, difficulty=9)


@pytest.mark.parametrize("task,level", ALL_LEVELS)
def test_checker_accepts_canonical_answer_and_rejects_others(task, level):
    for ex in generate(task, "train", 30, level, seed=5):
        assert check(ex, ex.answer) and check(ex, f"  {ex.answer}\n")
        assert check(ex.to_dict(), ex.answer)  # the saved .jsonl form works too
        assert check(Example.from_dict(json.loads(json.dumps(ex.to_dict()))), ex.answer)
        assert not check(ex, "") and not check(ex, "no idea") and not check(ex, None)
        if task != "countdown":
            assert check(ex, ex.answer + ".0") and not check(ex, str(int(ex.answer) + 1))


def test_arithmetic_solution_steps_are_correct():
    for ex in generate("arithmetic", "train", 60, seed=1):
        assert expr.evaluate(expr.parse(ex.meta["expression"])) == int(ex.answer)
        assert ex.question == f"Compute {ex.meta['expression']}."
        for line in ex.solution.splitlines()[1:-1]:  # "a op b = v, so the expression becomes E."
            step = re.match(r"(.+?) = (-?\d+)(?:, so the expression becomes (.+))?\.$", line)
            assert step, line
            assert expr.evaluate(expr.parse(step[1], allow_unary_minus=True)) == int(step[2])
            if step[3]:
                assert expr.evaluate(expr.parse(step[3], allow_unary_minus=True)) == int(ex.answer)
        assert ex.solution.endswith(f"= {ex.answer}.")


def test_arithmetic_checker_tolerance():
    ex = Example("arithmetic", "Compute 1000 + 234.", "1234", "", 1, {"expression": "1000 + 234"})
    for good in ["1234", " 1234 ", "1234.0", "1234.00", "1234.", "+1234", "1,234"]:
        assert check(ex, good), good
    for bad in ["1235", "1234.5", "12 34", "1234x", "1e3", "0x4d2", "1000 + 234", "١٢٣٤"]:
        assert not check(ex, bad), bad


def test_linear_answers_solve_the_equation():
    for ex in generate("linear", "train", 90, seed=2):
        m, x = ex.meta, int(ex.answer)
        assert m["a"] * x + m["b"] == m["d"] * x + m["e"] and m["a"] != m["d"]
        assert check(ex, f"x = {x}") and check(ex, f"x={x}") and check(ex, f"{x}.0")
        assert not check(ex, f"x = {x + 1}") and not check(ex, f"y = {x}") and not check(ex, f"x = {x}.5")


_OP = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")  # one written operation "x op y = z"


def _follow_countdown_trace(ex: Example) -> None:
    """Replay a worked solution line by line and assert that every line follows from the ones before."""
    nums, target = ex.meta["numbers"], ex.meta["target"]
    lines = ex.solution.splitlines()
    assert lines[0] == f"We need {target} from {', '.join(map(str, nums))}."
    assert lines[-1] == f"So {ex.answer} = {target}."
    check_line = lines[-2]
    assert check_line.startswith("Check: ") and check_line.endswith(f" = {target}.")
    assert len(_OP.findall(check_line)) == sum(ex.answer.count(op) for op in "+-*/")  # one step per operation
    board = list(nums)  # the numbers the current search works on, in the order written
    lasts = []  # the numbers tried last so far in the current three-number search
    listed: list[int] = []  # the results of the latest listing
    top_pair, pair_listed = [], []  # for four numbers: the latest pair and its results
    last = None  # the number the latest "Last" block puts last
    verdicts = 0
    for line in lines[1:-2]:
        ops = _OP.findall(line)
        for a, op, b, c in ops:
            assert expr.apply(op, int(a), int(b)) == int(c), line
        yes = line.endswith(" yes.")
        assert line.count("yes") == yes, line
        verdicts += yes
        if line.startswith("Try "):  # "Try r, c, d.": a result of the latest pair, then the other two numbers
            made, *others = (int(v) for v in line[4:-1].split(", "))
            assert made in pair_listed and sorted(others) == sorted((Counter(nums) - Counter(top_pair)).elements())
            board, lasts = [made] + others, []
        elif ":" in line:  # a listing: "Last n, rest a, b: ..." or, for four numbers, "a, b: ..."
            head = [int(v) for v in re.findall(r"\d+", line.split(":")[0])]
            if line.startswith("Last "):
                last, pair = head[0], head[1:]
                assert sorted(head) == sorted(board)
                lasts.append(last)  # every number in the order written, a repeated one only once
                assert lasts == list(dict.fromkeys(board))[:len(lasts)], line
            else:
                last, pair = None, head
                assert len(nums) == 4 and len(pair) == 2 and not Counter(pair) - Counter(nums)
            assert ops and all(sorted((int(a), int(b))) == sorted(pair) for a, _, b, _ in ops)
            listed = [int(c) for *_, c in ops]
            if last is None:
                top_pair, pair_listed = pair, listed
            assert all(v > 0 for v in listed) and (int(ops[-1][3]) == target) == yes  # stops at the target
        else:  # what the rest must make if `last` is the last operand; only a listed value gets "yes"
            assert last is not None and ops
            for k, (a, op, b, r) in enumerate(ops):
                assert sorted((int(a), int(b))) == sorted((target, last)), line
                assert int(r) <= max(listed)  # a value above every listed one is not written
                assert (int(r) in listed) == (yes and k == len(ops) - 1), line
    assert verdicts == 1 and lines[-3].endswith(" yes.")  # the search stops at its first success


@pytest.mark.parametrize("level,n", [(1, 200), (2, 20), (3, 20)])
def test_countdown_solutions_are_a_search_that_ends_in_the_answer(level, n):
    for ex in generate("countdown", "train", n, level, seed=3):
        nums, target = ex.meta["numbers"], ex.meta["target"]
        assert countdown_check(nums, target, ex.answer)
        assert len(nums) == (3 if level == 1 else 4) and target not in nums
        assert ex.question.startswith(f"Using the numbers [{', '.join(map(str, nums))}]")
        _follow_countdown_trace(ex)
        assert search_trace(nums, target) == (ex.solution, ex.answer)  # the same problem, the same trace


def test_countdown_search_order_and_edge_cases():
    solution, answer = search_trace([1, 6, 7], 48)
    assert "\n".join("    " + line for line in solution.splitlines()) in countdown.__doc__  # the documented example
    # numbers are tried in the order given: another order gives another trace, still a verified one
    reordered, other = search_trace([6, 7, 1], 48)
    assert reordered != solution and countdown_check([6, 7, 1], 48, other)
    # last steps of each kind: n / rest, n - rest, rest / n, two numbers only, rest + n, and for four numbers
    # a product of two pairs (the only shape that reaches 55 there)
    cases = {(1, 1, 6, 3): "6 / (1 + 1)", (2, 7, 2, 6): "7 - 2 / 2", (9, 1, 2, 5): "(9 + 1) / 2",
             (5, 1, 1, 2): "1 + 1", (2, 7, 2, 16): "7 * 2 + 2", (9, 2, 3, 2, 55): "(3 + 2) * (9 + 2)"}
    for (*nums, target), want in cases.items():
        solution, answer = search_trace(nums, target)
        assert answer == want and countdown_check(nums, target, answer)
        _follow_countdown_trace(Example("countdown", "q", answer, solution, 1, {"numbers": nums, "target": target}))
    assert search_trace([1, 2, 3], 100) is None  # no expression over them reaches 100


def test_countdown_level_1_traces_fit_the_sampling_budget(tok):
    # the R1 stages sample at most 256 new tokens for the whole <think>...</think><answer>...</answer>
    lengths = sorted(len(tok.encode(r1_completion(ex))) for ex in generate("countdown", "train", 300, 1, seed=4))
    assert lengths[-1] <= 256 and lengths[int(0.95 * len(lengths))] <= 200


def test_countdown_check_rules():
    nums, target = [3, 5, 7, 9], 24
    assert countdown_check(nums, target, "(9 - 5) * 7 - 4") is False  # 4 is not given
    assert countdown_check(nums, target, "3 * (9 - 5 + 7) - 9") is False  # 9 used twice
    assert countdown_check(nums, target, "9 + 7 + 5 + 3")
    assert countdown_check(nums, target, "9 + 7 + 5 + 3 = 24")
    assert countdown_check(nums, target, "9 × 3 - 3") is False
    assert countdown_check(nums, target, "(9 + 3) * (7 - 5)")  # at most once: subsets are fine too
    assert countdown_check(nums, 21, "3 * 7")
    assert countdown_check(nums, target, "9 + 7 + 5 + 3 = 25") is False
    assert countdown_check([2, 3, 12], 8, "12 / 3 * 2")
    assert countdown_check([2, 3, 9], 6, "9 / 2 * 3 - 7.5") is False  # float literal
    assert countdown_check([2, 3, 9], 27 // 2, "9 / 2 * 3") is False  # inexact division 9/2
    assert countdown_check([5, 5], 0, "5 - 5") and countdown_check([5, 5], 1, "5 / 5")
    assert countdown_check([5], 0, "5 / 0 * 0") is False


@pytest.mark.parametrize("evil", [
    "__import__('os').system('echo pwned')", "9**9**9", "9 ** 9 ** 9", "(9).__class__", "open('/etc/passwd')",
    "lambda: 9", "[9 for _ in range(10**9)]", "9 if True else 3", "-9 + 33", "9 // 3", "9 % 3", "9 << 99999",
    "'9' * 10**9", "True + 23", "1+" * 5000 + "1", "(" * 1000 + "9" + ")" * 1000, "9\n+15", "9; 15", "\x00",
])
def test_countdown_check_rejects_malicious_input_fast(evil):
    t0 = time.perf_counter()
    assert countdown_check([9, 9, 9, 3, 15, 33, 23, 10], 24, evil) is False
    assert time.perf_counter() - t0 < 0.5


def test_expr_render_parse_roundtrip():
    rng = random.Random(0)
    for _ in range(200):
        pool = [rng.randint(1, 30) for _ in range(rng.randint(1, 6))]
        while len(pool) > 1:
            i = rng.randrange(len(pool) - 1)
            pool[i:i + 2] = [expr.BinOp(rng.choice("+-*"), pool[i], pool[i + 1])]
        assert expr.parse(expr.render(pool[0])) == pool[0]


# ------------------------------------------------------------------------------------ R1 format

@pytest.mark.parametrize("task", sorted(TASKS))
def test_r1_format(task):
    for ex in generate(task, "test", 10, seed=0):
        completion = r1_completion(ex)
        assert completion == f"<think>\n{ex.solution}\n</think>\n<answer>{ex.answer}</answer>"
        assert format_ok(completion) and check(ex, extract_answer(completion))
        prompt = r1_prompt(ex)
        assert prompt.endswith(f"User: {ex.question} Assistant: ") and "<think>" in prompt
        assert r1_document(ex) == prompt + completion
    assert extract_answer("<answer>1</answer> then <answer> 2 </answer>") == "2"
    assert extract_answer("no tags") is None
    assert not format_ok("<think>a</think><answer>1</answer><answer>2</answer>")
    assert not format_ok("hi <think>a</think><answer>1</answer>")


# ------------------------------------------------------------------------------------ tokenizer

@pytest.fixture(scope="module")
def corpus():
    return default_corpus(240, seed=0)


@pytest.fixture(scope="module")
def tok(corpus):
    return train_tokenizer(corpus, vocab_size=640)


UNICODE_SAMPLES = [
    "", " ", "  leading and trailing  ", "Héllo wörld — “quotes” ‘x’ …", "中文字符测试，标点。", "日本語のテキスト",
    "emoji 😀👍🏽👨‍👩‍👧 flags 🇫🇷", "combining e\u0301 a\u0308", "tabs\tand\nnewlines\r\n\n\n", "math ∑ ∫ √ ≤ ≥ π",
    "null\x00byte and \x7f del", "zero\u200bwidth", "<think>\n1 + 2 = 3\n</think>\n<answer>3</answer>",
    "<|User|>hi<|Assistant|>ok<|end_of_sentence|>", "<thinking> is not <think", "1234567890 -42 3.14",
]


def test_tokenizer_round_trip_is_lossless(tok):
    rng = random.Random(1)
    samples = list(UNICODE_SAMPLES)
    for _ in range(50):  # random code points from every plane, surrogates excluded
        cps = [rng.choice([rng.randint(0, 0x7F), rng.randint(0x80, 0xD7FF), rng.randint(0xE000, 0x10FFFF)])
               for _ in range(rng.randint(1, 40))]
        samples.append("".join(map(chr, cps)))
    for s in samples:
        assert tok.decode(tok.encode(s)) == s, repr(s)
    assert tok.encode_batch(samples) == [tok.encode(s) for s in samples]


def test_special_tokens_are_single_fixed_ids(tok):
    names = ["<|begin_of_sentence|>", "<|end_of_sentence|>", "<|pad|>", "<|User|>", "<|Assistant|>",
             "<think>", "</think>", "<answer>", "</answer>"]
    for i, name in enumerate(names):
        assert tok.token_to_id(name) == i and tok.encode(name) == [i]
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert tok.encode("<think>x</think>")[0] == 5 and tok.encode("<think>x</think>")[-1] == 6
    ids = [tok.bos_id] + tok.encode("<think>a</think>") + [tok.eos_id]
    assert tok.decode(ids, skip_special_tokens=True) == "<think>a</think>"  # reasoning tags survive
    assert 256 + len(names) < tok.vocab_size <= 640
    assert all(len(tok.encode(d)) == 1 for d in "0123456789")
    assert tok.encode("12345") == [tok.encode(d)[0] for d in "12345"]  # digits split one per token
    # a number's first digit keeps the space before it: no digit token follows a bare space token
    pieces = [tok.decode([i]) for i in tok.encode("4 * 13 = 52")]
    assert pieces == ["4", " *", " 1", "3", " =", " 5", "2"]


def test_prompt_completion_border_is_token_aligned(tok):
    for ex in generate("countdown", "test", 5):
        p, c = r1_prompt(ex), r1_completion(ex)
        assert tok.encode(p) + tok.encode(c) == tok.encode(p + c)


def test_train_tokenizer_learns_merges(tok, corpus):
    # BPE compresses: far fewer tokens than bytes on the corpus it was trained on
    assert sum(map(len, tok.encode_batch(corpus[:20]))) < 0.5 * sum(len(d.encode()) for d in corpus[:20])
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["abc"], vocab_size=100)


def test_chat_template(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "<think>\n2+2=4\n</think>\n<answer>4</answer>"},
            {"role": "user", "content": "3+3?"}]
    assert tok.apply_chat_template(msgs) == (
        "<|begin_of_sentence|>Be brief.<|User|>2+2?<|Assistant|><think>\n2+2=4\n</think>\n<answer>4</answer>"
        "<|end_of_sentence|><|User|>3+3?<|Assistant|>")
    assert tok.apply_chat_template(msgs[1:2], add_generation_prompt=False) == "<|begin_of_sentence|><|User|>2+2?"
    with pytest.raises(Exception, match="unknown role"):
        tok.apply_chat_template([{"role": "robot", "content": "x"}])


def test_save_load(tok, tmp_path):
    tok.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert (cfg["bos_token"], cfg["eos_token"], cfg["pad_token"]) == ("<|begin_of_sentence|>",
                                                                      "<|end_of_sentence|>", "<|pad|>")
    assert cfg["model_max_length"] == 4096 and "chat_template" in cfg
    back = Tokenizer.load(tmp_path)
    assert back.vocab_size == tok.vocab_size
    for s in UNICODE_SAMPLES:
        assert back.encode(s) == tok.encode(s)
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Tokenizer.load(tmp_path / "missing")


def test_transformers_autotokenizer_matches(tok, corpus, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "deepseek_v3", "vocab_size": tok.vocab_size}))
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert len(hf) == tok.vocab_size
    for s in UNICODE_SAMPLES + corpus[:5]:
        ids = tok.encode(s)
        assert hf(s)["input_ids"] == ids and hf(s, add_special_tokens=False)["input_ids"] == ids
        assert hf.decode(ids) == s
    ex = generate("countdown", "test", 1)[0]
    for msgs in (r1_messages(ex), r1_messages(ex, system="You are a solver."), r1_messages(ex)[:1]):
        for gen in (True, False):
            ours = tok.apply_chat_template(msgs, add_generation_prompt=gen)
            assert hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen) == ours
            got = hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen)
            got = got["input_ids"] if isinstance(got, dict) or hasattr(got, "keys") else got
            assert list(got) == tok.encode(ours)
    hf.save_pretrained(tmp_path / "resaved")  # newer transformers move the template to chat_template.jinja
    back = Tokenizer.load(tmp_path / "resaved")
    assert back.apply_chat_template(r1_messages(ex)) == tok.apply_chat_template(r1_messages(ex))
    assert back.encode(UNICODE_SAMPLES[6]) == tok.encode(UNICODE_SAMPLES[6])


# --------------------------------------------------------------------------------------- corpus

def test_default_corpus(corpus):
    assert corpus == default_corpus(240, seed=0) and len(corpus) == 240
    assert corpus != default_corpus(240, seed=1)
    paragraphs = natural_paragraphs()
    assert len(paragraphs) >= 5 and sum(len(p.encode()) for p in paragraphs) < 20_000
    assert sum(d in paragraphs for d in corpus) == 240 // 20
    for name in TASKS:
        assert any(f"User: {q.question} " in d for d in corpus for q in generate(name, "train", 3))
    test_docs = default_corpus(60, seed=0, split="test")
    assert not set(test_docs) & set(default_corpus(600, seed=0)) and not set(test_docs) & set(paragraphs)


def test_drill_documents_hold_the_solutions_single_steps():
    examples = [ex for name in TASKS for ex in generate(name, "train", 30, difficulty=1)]
    steps = solution_steps(examples)
    # every step is one correct operation that occurs in some worked solution
    assert len(steps) > 60
    for step in steps:
        a, op, b, _, c = step.split()
        assert expr.apply(op, int(a), int(b)) == int(c)
        assert any(step in ex.solution for ex in examples)
    # a multi-operation line is not cut into a wrong fact ("7 * 1 + 16 = 23" is not "1 + 16 = 23")
    check_line = Example("linear", "q", "1", "Check: 7 * 1 + 16 = 23, which is the right side.", 1)
    assert solution_steps([check_line]) == []
    docs = drill_documents(examples, 5, steps_per_doc=12, seed=3)
    assert docs == drill_documents(examples, 5, steps_per_doc=12, seed=3) != drill_documents(examples, 5, 12, seed=4)
    assert len(docs) == 5 and all(len(d.split("\n")) == 12 and set(d.split("\n")) <= set(steps) for d in docs)
    with pytest.raises(ValueError, match="no single-operation steps"):
        drill_documents([check_line], 1)


# -------------------------------------------------------------------------------------- sources

def test_load_documents(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("first para\nline two\n\n  \n\nsecond para\n\n\n")
    (tmp_path / "sub" / "b.jsonl").write_text('{"text": "j1"}\n\n{"text": "j2", "x": 1}\n')
    (tmp_path / "c.jsonl").write_text('{"body": "k1"}\n')
    assert load_documents(tmp_path / "a.txt") == ["first para\nline two\n\n  \n\nsecond para\n\n\n"]
    assert load_documents(tmp_path / "a.txt", txt_split="blank_line") == ["first para\nline two", "second para"]
    assert load_documents(tmp_path / "c.jsonl", text_field="body") == ["k1"]
    with pytest.raises(ValueError, match="string field 'text'"):
        load_documents(tmp_path)  # c.jsonl has no "text"
    (tmp_path / "c.jsonl").unlink()
    assert load_documents(tmp_path, txt_split="blank_line") == ["first para\nline two", "second para", "j1", "j2"]
    with pytest.raises(FileNotFoundError):
        load_documents(tmp_path / "nope.txt")
    (tmp_path / "d.csv").write_text("x")
    with pytest.raises(ValueError, match="unsupported"):
        load_documents(tmp_path / "d.csv")


def test_load_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": ["p1", None, "p2 ünï"], "id": [1, 2, 3]}), tmp_path / "x.parquet")
    assert load_documents(tmp_path / "x.parquet") == ["p1", "p2 ünï"]
    with pytest.raises(ValueError, match="no column 'content'"):
        load_documents(tmp_path / "x.parquet", text_field="content")


# --------------------------------------------------------------------------------------- packing

def test_packing_small_example():
    docs = [[0, 10, 11, 1], [0, 12, 1], [0, 13, 14, 15, 16, 17, 1]]
    ds = PackedDataset(docs, seq_len=4, pad_id=2)
    rows = [ds[i] for i in range(len(ds))]
    assert [r["tokens"].tolist() for r in rows] == [[0, 10, 11, 1, 0], [12, 1, 0, 13, 14], [15, 16, 17, 1, 2]]
    assert [r["positions"].tolist() for r in rows] == [[0, 1, 2, 3, 0], [0, 1, 0, 1, 2], [0, 1, 2, 3, 0]]
    assert [r["doc_ids"].tolist() for r in rows] == [[0, 0, 0, 0, 1], [0, 0, 1, 1, 1], [0, 0, 0, 0, -1]]
    b = collate(rows)
    assert b.input_ids.tolist()[2] == [15, 16, 17, 1] and b.labels.tolist()[2] == [16, 17, 1, IGNORE_INDEX]
    assert b.positions.shape == (3, 4) and b.doc_ids.tolist()[1] == [0, 0, 1, 1]


def test_packing_covers_every_token_once(tok, corpus):
    token_docs = tokenize_documents(corpus[:60], tok)
    assert all(d[0] == tok.bos_id and d[-1] == tok.eos_id for d in token_docs)
    ds = PackedDataset(token_docs, seq_len=97, pad_id=tok.pad_id)
    stream = [t for d in token_docs for t in d]
    rows = [ds[i] for i in range(len(ds))]
    assert all(r["tokens"].shape == (98,) and r["tokens"].dtype == torch.int64 for r in rows)
    flat = torch.cat([r["tokens"] for r in rows])
    doc_ids = torch.cat([r["doc_ids"] for r in rows])
    assert flat[doc_ids >= 0].tolist() == stream and len(ds) == -(-len(stream) // 98)
    assert (flat[len(stream):] == tok.pad_id).all() and ds.num_tokens == len(stream)
    # positions restart at 0 exactly at document starts (and row starts), +1 everywhere else
    starts = {sum(map(len, token_docs[:k])) for k in range(len(token_docs))}
    for i, r in enumerate(rows):
        pos, ids = r["positions"], r["doc_ids"]
        for j in range(98):
            g = i * 98 + j
            if g >= len(stream):
                assert pos[j] == 0 and ids[j] == -1
            elif g in starts:
                assert pos[j] == 0 and r["tokens"][j] == tok.bos_id and (j == 0 or ids[j] == ids[j - 1] + 1)
            elif j > 0:
                assert pos[j] == pos[j - 1] + 1 and ids[j] == ids[j - 1]
            else:
                assert pos[j] == 0 and ids[j] == 0


def test_document_causal_mask():
    doc_ids = torch.tensor([[0, 0, 1, 1, -1]])
    m = document_causal_mask(doc_ids)[0, 0]
    assert m.shape == (5, 5)
    assert m.tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 1]]
    # with SDPA, a packed row attends exactly like its documents run one by one
    rows = [PackedDataset([[0, 5, 6, 1], [0, 7, 8, 9, 10, 1], [0, 11, 1]], 12, pad_id=2)[0]]
    ids = collate(rows).doc_ids
    q, k, v = (torch.randn(1, 2, 12, 4, dtype=torch.float64) for _ in range(3))
    packed = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=document_causal_mask(ids))
    for d in range(3):
        sel = ids[0] == d
        assert sel.any()
        alone = torch.nn.functional.scaled_dot_product_attention(q[:, :, sel], k[:, :, sel], v[:, :, sel],
                                                                 is_causal=True)
        torch.testing.assert_close(packed[:, :, sel], alone)


def test_split_documents():
    docs = [f"doc {i}" for i in range(50)]
    train, val = split_documents(docs, 0.1, seed=0)
    assert len(val) == 5 and sorted(train + val) == sorted(docs) and not set(train) & set(val)
    assert (train, val) == split_documents(docs, 0.1, seed=0) and val != split_documents(docs, 0.1, seed=1)[1]
    assert split_documents(docs[:3], 0.01)[1] != [] and split_documents(docs, 0.0)[1] == []


def _rows(batch):
    return [tuple(r) for r in batch.input_ids.tolist()]


def test_batch_iterator_epochs_and_resume(tok, corpus):
    train, val = build_datasets(corpus[:80], tok, seq_len=32, val_fraction=0.1)
    assert len(train) > 0 and len(val) > 0
    it = BatchIterator(train, batch_size=8, seed=7)
    b = next(it)
    assert b.input_ids.shape == (8, 32) and b.input_ids.dtype == torch.int64 and b.labels.shape == (8, 32)
    assert torch.equal(b.labels[:, :-1], b.input_ids[:, 1:])
    unique = PackedDataset([[0, *range(10 + 40 * k, 40 + 40 * k), 1] for k in range(30)], 15, pad_id=2)
    it = BatchIterator(unique, batch_size=8, seed=7)  # every row of `unique` differs from the others
    epoch0 = [r for _ in range(it.steps_per_epoch) for r in _rows(next(it))]
    assert len(set(epoch0)) == len(epoch0) == len(unique) // 8 * 8  # no row twice in an epoch
    assert it.epoch == 0
    epoch1 = [r for _ in range(it.steps_per_epoch) for r in _rows(next(it))]
    assert it.epoch == 1 and epoch1 != epoch0 and len(set(epoch1)) == len(epoch1)  # reshuffled
    # resume mid-epoch and across the epoch border: the same batches follow
    it = BatchIterator(train, batch_size=8, seed=7)
    for _ in range(it.steps_per_epoch - 2):
        next(it)
    state = json.loads(json.dumps(it.state_dict()))
    expected = [next(it) for _ in range(5)]
    resumed = BatchIterator(train, batch_size=8, seed=7)
    resumed.load_state_dict(state)
    for want in expected:
        got = next(resumed)
        assert all(torch.equal(getattr(got, f), getattr(want, f)) for f in vars(want))
    with pytest.raises(ValueError, match="cannot resume"):
        BatchIterator(train, batch_size=4, seed=7).load_state_dict(state)
    with pytest.raises(ValueError, match="cannot resume"):
        BatchIterator(train, batch_size=8, seed=8).load_state_dict(state)
    # data parallel: ranks split each global batch
    one = next(BatchIterator(train, batch_size=8, seed=7))
    halves = [next(BatchIterator(train, batch_size=4, seed=7, rank=r, world_size=2)) for r in range(2)]
    assert torch.equal(torch.cat([h.input_ids for h in halves]), one.input_ids)
    # evaluation: every row once, in order
    assert sum(b.input_ids.shape[0] for b in eval_batches(val, 3)) == len(val)
    with pytest.raises(ValueError, match="batch_size"):
        BatchIterator(val, batch_size=len(val) + 1)
