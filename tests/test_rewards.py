"""Rule-based rewards: hand-written correct / wrong / malformed / adversarial completions, math_verify, shaping."""

import math
import time

import pytest

from nanoseek.data import Example, generate, r1_completion
from nanoseek.rl import (REWARDS, accuracy_reward, combine, cosine_length_reward, equation_reward, equations,
                         final_answer, format_reward, get_reward, gold_text, language_consistency_reward, math_equal,
                         repetition_penalty_reward, soft_overlong_reward)


@pytest.fixture(scope="module")
def countdown():
    return generate("countdown", "train", 1, difficulty=1, seed=0)[0]


@pytest.fixture(scope="module")
def arithmetic():
    return generate("arithmetic", "train", 1, difficulty=1, seed=0)[0]


def done(think: str, answer: str) -> str:
    return f"<think>\n{think}\n</think>\n<answer>{answer}</answer>"


def acc(completions, example, **kw):
    return accuracy_reward(completions, [example] * len(completions), **kw)


# ---------------------------------------------------------------------------------- accuracy, format

def test_correct_and_wrong_answers(countdown, arithmetic):
    wrong = str(int(arithmetic.answer) + 1)
    assert acc([r1_completion(arithmetic), done("guess", wrong)], arithmetic) == [1.0, 0.0]
    assert acc([r1_completion(countdown), done("guess", "1 + 1")], countdown) == [1.0, 0.0]
    assert acc([r1_completion(arithmetic)], arithmetic.to_dict()) == [1.0]  # the saved dict form
    assert format_reward([r1_completion(arithmetic), done("guess", wrong)]) == [1.0, 1.0]


@pytest.mark.parametrize("text,accuracy,fmt", [
    ("<think>x</think>\n<answer>{a}</answer>", 1.0, 1.0),
    ("<think>x\n<answer>{a}</answer>", 0.0, 0.0),                      # think never closed: still reasoning
    ("<think>x</think>\n{a}", 0.0, 0.0),                                # no answer tags
    ("<answer>{a}</answer>\n<think>x</think>", 0.0, 0.0),               # wrong order
    ("<think>x</think><answer>{a}", 0.0, 0.0),                          # answer never closed
    ("</answer>{a}<answer><think>x</think>", 0.0, 0.0),
    ("Sure! <think>x</think> <answer>{a}</answer> Bye.", 1.0, 0.0),    # text outside: format only
    ("<think>x</think><think>y</think><answer>{a}</answer>", 0.0, 0.0),  # a second think block
    ("<think>x</think><answer>{a}</answer><answer>{a}</answer>", 0.0, 0.0),  # answered twice
    ("<think>x</think><answer>{w}</answer><answer>{a}</answer>", 0.0, 0.0),  # hedged: wrong then right
    ("<think>x <answer>{a}</answer></think>", 0.0, 0.0),               # answer only inside the reasoning
    ("<think>x <answer>{w}</answer></think><answer>{a}</answer>", 1.0, 0.0),  # draft in think is ignored
    ("<think>x <answer>{a}</answer></think><answer>{w}</answer>", 0.0, 0.0),
    ("<think>x</think><answer><answer>{a}</answer></answer>", 0.0, 0.0),  # nested tags
    ("<think>x</think><answer><answer>{a}</answer>", 0.0, 0.0),
    ("<think>x</think></answer>{a}<answer>", 0.0, 0.0),                # closing tag first
    ("<answer>{a}</answer>", 1.0, 0.0),                                 # no think block at all
    ("", 0.0, 0.0),
])
def test_malformed_and_adversarial(arithmetic, text, accuracy, fmt):
    c = text.format(a=arithmetic.answer, w=int(arithmetic.answer) + 1)
    assert acc([c], arithmetic) == [accuracy]
    assert format_reward([c]) == [fmt]
    # with require_format the answer counts only inside the full template
    assert acc([c], arithmetic, require_format=True) == [min(accuracy, fmt)]


def test_final_answer_rule():
    assert final_answer("<think>a</think>\n<answer> 42 </answer>") == "42"
    assert final_answer("<think>a</think><answer>1</answer><answer>2</answer>") is None
    assert final_answer("<think>a <answer>1</answer>") is None
    assert final_answer("<think>a</think><answer><answer>1</answer>") is None  # math_verify would read "1" here
    assert final_answer("<think>a</think></answer>1<answer>") is None
    assert final_answer("a</think><answer>7</answer>") == "7"
    assert final_answer("<think>a</think><answer>" + "9" * 2000 + "</answer>") is None  # longer than MAX_ANSWER_CHARS


def test_think_opened_prompts(arithmetic):
    c = f"I compute it.\n</think>\n<answer>{arithmetic.answer}</answer>"
    assert format_reward([c], think_opened=True) == [1.0]
    assert format_reward([c]) == [0.0]                                   # judged alone it lacks "<think>"
    assert acc([c], arithmetic, think_opened=True, require_format=True) == [1.0]
    reopened = "<think>" + c
    assert format_reward([reopened], think_opened=True) == [0.0]        # two opening tags
    assert acc([reopened], arithmetic, think_opened=True) == [1.0]     # the answer after </think> is still found
    assert acc(["no tags at all " + arithmetic.answer], arithmetic, think_opened=True) == [0.0]


def test_countdown_answers_are_parsed_never_run(countdown, tmp_path):
    flag = tmp_path / "pwned"
    attacks = [f"__import__('os').system('touch {flag}')", "__import__('os')", "9**9**9**9",
               "(" * 300 + "1" + ")" * 300, " + ".join(map(str, countdown.meta["numbers"] * 2))]
    t0 = time.perf_counter()
    assert acc([done("x", a) for a in attacks], countdown) == [0.0] * len(attacks)
    assert time.perf_counter() - t0 < 2 and not flag.exists()


def test_huge_numbers(arithmetic):
    t0 = time.perf_counter()
    assert acc([done("x", "9" * 500), done("x", "1" + "0" * 60)], arithmetic) == [0.0, 0.0]
    gold = {"question": "q", "answer": "2"}
    for pred in ("10^{10^{10}}", "9**9**9", "9^{9^{9}}", "(10^{10})!", "2^{100000}"):
        assert not math_equal("2", pred), pred
    assert accuracy_reward([done("x", "10^{10^{10}}")], [gold]) == [0.0]
    assert time.perf_counter() - t0 < 4  # rejected by the size guards, not by the timeouts


def test_example_type_is_checked():
    with pytest.raises(TypeError, match="cannot check"):
        accuracy_reward([done("x", "1")], [{"question": "no reference"}])
    with pytest.raises(ValueError, match="repeat each example"):
        accuracy_reward([done("x", "1")] * 2, [{"answer": "1"}])


# --------------------------------------------------------------------------------------- math_verify

def test_gsm8k_reference_is_the_text_after_the_marker():
    assert gold_text("3 + 4 = <<3+4=7>>7 apples, 1,000 more.\n#### 1,007") == "1007"
    assert gold_text("  \\frac{1}{2} ") == "\\frac{1}{2}"


@pytest.mark.parametrize("gold,pred,ok", [
    ("\\frac{1}{2}", "0.5", True),
    ("0.5", "\\frac{1}{2}", True),
    ("\\frac{1}{2}", "1/2", True),
    ("\\frac{1}{2}", "0.6", False),
    ("\\{1, 2\\}", "\\{2, 1\\}", True),
    ("\\{1, 2\\}", "\\{1, 3\\}", False),
    ("\\{1, 2\\}", "2", False),
    ("\\sqrt{2}", "\\sqrt 2", True),
    ("Natalia sold 48 / 2 = 24 clips in May.\n#### 72", "72", True),
    ("Natalia sold 48 / 2 = 24 clips in May.\n#### 72", "72.0", True),
    ("Natalia sold 48 / 2 = 24 clips in May.\n#### 72", "71", False),
    ("Total is 1000 + 234.\n#### 1,234", "1234", True),
    ("He buys 3 packs (20 pens each), so 3 * 20 = <<3*20=60>>60 pens.\n#### 60", "60", True),
    ("The answer is $\\boxed{3}$.", "3", True),
    ("42", "x = 42", True),
    ("42", "", False),
    ("", "42", False),  # unparseable reference -> 0, never an error
])
def test_math_verify(gold, pred, ok):
    assert math_equal(gold, pred) is ok
    assert accuracy_reward([done("x", pred)], [{"question": "q", "answer": gold}]) == [float(ok)]


# ------------------------------------------------------------------------------------ language, length

def test_language_consistency():
    r = language_consistency_reward([
        "<think>All plain English words here.</think><answer>1</answer>",
        "<think>I think 这是 test</think><answer>1</answer>",  # I, think, 这, 是, test -> 3 of 5
        "<think>a naïve idea</think><answer>1</answer>",       # 2 of 3
        "<answer>1</answer>",                                    # no reasoning
        "<think>3 + 4 = 7</think><answer>7</answer>",           # no words
        "<think>unclosed",
    ])
    assert r == pytest.approx([1.0, 0.6, 2 / 3, 0.0, 0.0, 0.0])
    # each CJK character is a word: "mixed", "中", "文" -> 1 of 3
    assert language_consistency_reward(["mixed 中文</think>"], think_opened=True) == pytest.approx([1 / 3])


def test_soft_overlong_punishment():
    lengths = [0, 50, 80, 90, 95, 100, 101, 10_000]
    expected = [0.0, 0.0, 0.0, -0.5, -0.75, -1.0, -1.0, -1.0]  # L_max 100, cache 20: free up to 80
    texts = ["x"] * len(lengths)
    assert soft_overlong_reward(texts, max_length=100, cache=20, completion_lengths=lengths) == pytest.approx(expected)
    ids = [[0] * n for n in lengths]
    assert soft_overlong_reward(texts, max_length=100, cache=20, completion_ids=ids) == pytest.approx(expected)

    class CharTokenizer:
        def encode(self, text):
            return list(text)

    assert soft_overlong_reward(["a" * n for n in lengths], max_length=100, cache=20,
                                tokenizer=CharTokenizer()) == pytest.approx(expected)
    with pytest.raises(ValueError, match="completion_lengths"):
        soft_overlong_reward(texts, max_length=100, cache=20)
    with pytest.raises(ValueError, match="cache"):
        soft_overlong_reward(texts, max_length=100, cache=200, completion_lengths=lengths)


def test_cosine_length_reward(arithmetic):
    right, wrong = r1_completion(arithmetic), done("x", str(int(arithmetic.answer) + 1))
    texts, lengths = [right, right, right, wrong, wrong, wrong, right], [0, 50, 100, 0, 50, 100, 500]
    r = cosine_length_reward(texts, [arithmetic] * len(texts), max_length=100, completion_lengths=lengths)
    # a + (b - a)(1 + cos(pi n / L)) / 2: correct b=1.0 -> a=0.5; wrong b=-1.0 -> a=-0.5; midpoint (a+b)/2
    assert r == pytest.approx([1.0, 0.75, 0.5, -1.0, -0.75, -0.5, 0.5])


def test_repetition_penalty():
    r = repetition_penalty_reward(["a b c a b c", "one two three four", "to be", "", "x x x x x"])
    # "a b c a b c": 4 trigrams, 3 distinct -> -(1 - 3/4); "x x x x x": 3 trigrams, 1 distinct -> -(2/3)
    assert r == pytest.approx([-0.25, 0.0, 0.0, 0.0, -2 / 3])


@pytest.mark.parametrize("task", ["arithmetic", "countdown", "linear"])
def test_every_equation_of_a_worked_solution_holds(task):
    for ex in [e for level in (1, 2, 3) for e in generate(task, "train", 40, difficulty=level, seed=1)]:
        checks = equations(ex.solution, ex.question)  # true, and every input is in the question or derived
        assert checks and all(checks), ex.solution
        assert equation_reward([r1_completion(ex)], [ex]) == [1.0]


def test_equations_by_hand():
    # a chain gives one equation per "=" with arithmetic on both sides; "3x" is not a number
    assert equations("Subtract 8 from both sides: 3x = 11 - 8 = 6.\nDivide: x = 6 / 3 = 2.") == [False, True]
    assert equations("Check: 3 * 2 + 8 = 14, and (9 - 1) / 4 = 2 yes") == [True, True]
    assert equations("7 / 2 = 3") == [False]                  # exact division, no rounding
    assert equations("5 / 0 = 1, then 2 + 2 = 4") == [False, True]
    assert equations("x = 4 and 12 = 12 and 2 + = 3") == []   # no operator, or not an expression
    assert equations("a = __import__('os') - 1 = 2") == []   # a letter touches the side: never parsed, never run
    assert equations("-3 + 5 = 2") == [True]
    right = "<think>\n2 * 7 = 14, so 14 + 6 = 21.\n</think>\n<answer>21</answer>"
    assert equation_reward([right, "<think>no sums here</think><answer>1</answer>", "2 + 2 = 4", ""]) == [
        0.5, 0.0, 0.0, 0.0]                                   # only a closed think block counts
    assert equation_reward(["2 + 2 = 4</think><answer>4</answer>"], think_opened=True) == [1.0]


def test_equations_grounded_in_the_question():
    question = "Solve for x: 4x + 10 = 38."
    solved = "Subtract 10: 4x = 38 - 10 = 28.\nDivide: x = 28 / 4 = 7.\nCheck: 4 * 7 + 10 = 38."
    idle = "Subtract 10: 5x = 15 - 10 = 0.\nDivide: x = 0 / 5 = 0.\nCheck: 5 * 0 + 1 = 1."  # true, unrelated
    assert equations(solved, question) == [True, True, True]
    assert equations(idle) == [False, True, True] and equations(idle, question) == [False, False, False]
    # a wrong result still grounds the steps that use it: the slip is charged once, where it happened
    assert equations("38 - 10 = 27, 27 + 10 = 37", question) == [False, True]
    ex = {"question": question, "answer": "7"}
    assert equation_reward([f"<think>{solved}</think><answer>7</answer>",
                            f"<think>{idle}</think><answer>0</answer>"], [ex, ex]) == [1.0, 0.0]


# ---------------------------------------------------------------------------------- registry, combine

def test_registry_and_combine(arithmetic):
    assert {"accuracy", "format", "language", "soft_overlong", "cosine", "repetition", "equations"} <= set(REWARDS)
    with pytest.raises(KeyError, match="known rewards"):
        get_reward("nope")
    right = r1_completion(arithmetic)
    wrong = done("x", str(int(arithmetic.answer) + 1))
    bad = f"<answer>{arithmetic.answer}</answer>"

    def shortness(completions, examples, **kwargs):  # a user reward plugs in by the same API
        return [1.0 / len(c) for c in completions]

    reward = combine({"acc": "accuracy", "fmt": get_reward("format"), "short": shortness,
                      "len": get_reward("soft_overlong", max_length=10, cache=5)}, weights=[1.0, 0.5, 2.0, 1.0])
    scores = reward([right, wrong, bad], [arithmetic] * 3, completion_lengths=[4, 8, 20])
    assert scores.per_reward["acc"] == [1.0, 0.0, 1.0]
    assert scores.per_reward["fmt"] == [1.0, 1.0, 0.0]
    assert scores.per_reward["len"] == pytest.approx([0.0, -0.6, -1.0])
    for i, c in enumerate([right, wrong, bad]):
        expected = (scores.per_reward["acc"][i] + 0.5 * scores.per_reward["fmt"][i] + 2.0 / len(c)
                    + scores.per_reward["len"][i])
        assert scores.total[i] == pytest.approx(expected)

    r1_zero = combine([accuracy_reward, format_reward])  # R1-Zero: equal weights
    assert r1_zero.names == ("accuracy_reward", "format_reward")
    assert r1_zero([right, bad], [arithmetic] * 2).total == [2.0, 1.0]
    with pytest.raises(ValueError, match="weights"):
        combine(["accuracy", "format"], weights=[1.0])
    with pytest.raises(ValueError, match="unique"):
        combine(["format", "format"])
    with pytest.raises(ValueError, match="finite"):
        combine([lambda c, e, **k: [math.nan] * len(c)])(["x"], None)


def test_empty_completion_scores_nothing(arithmetic):
    reward = combine(["accuracy", "format", "language", "repetition"])
    scores = reward([""], [arithmetic])
    assert scores.total == [0.0] and all(v == [0.0] for v in scores.per_reward.values())


def test_user_math_dataset_example():
    ex = {"question": "What is half of one?", "answer": "\\frac{1}{2}"}
    out = accuracy_reward([done("half", "0.5"), done("half", "$\\boxed{\\dfrac{1}{2}}$"), done("half", "2")], [ex] * 3)
    assert out == [1.0, 1.0, 0.0]


def test_math_verify_off_the_main_thread():
    # math_verify's timeouts use signal.alarm (main thread only); off it they are switched off, not an error
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(math_equal, "\\frac{1}{2}", "0.5").result() is True
        assert pool.submit(math_equal, "2", "10^{10^{10}}").result() is False


def test_examples_of_other_tasks_use_math_verify():
    gsm = Example(task="gsm8k", question="q", answer="Half of 144 is 72.\n#### 72", solution="", difficulty=1)
    assert accuracy_reward([done("x", "72"), done("x", "73")], [gsm, gsm]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="needs the examples"):
        accuracy_reward([done("x", "72")], None)
