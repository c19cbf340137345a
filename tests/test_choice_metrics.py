"""The strict multiple-choice rule and MMMU's published parsing, on hand-written cases (adversarial ones included)."""
import pytest

from vlm.choice_metrics import (aggregate_choice, breakdown_choice, mmmu_extract_numbers, mmmu_normalize,
                                mmmu_open_correct, mmmu_parse_choice, mmmu_parse_open, score_choice, strict_choice)
from vlm.grpo import extract_answer

OPTS = {"A": "Pleural effusion", "B": "Pneumothorax", "C": "Cardiomegaly", "D": "No finding"}


@pytest.mark.parametrize("prediction, letter, how", [
    ("B", "B", "letter"), ("b", "B", "letter"), (" (B) ", "B", "letter"), ("[C]", "C", "letter"),
    ("B.", "B", "letter"), ("B)", "B", "letter"), ("B:", "B", "letter"), ("**B**", "B", "letter"),
    ("Answer: B", "B", "letter"), ("Option C", "C", "letter"), ("(b)", "B", "letter"),
    ("B. Pneumothorax", "B", "letter+text"), ("(B) pneumothorax.", "B", "letter+text"),
    ("Pneumothorax", "B", "text"), ("pneumothorax.", "B", "text"), ("  no   finding ", "D", "text"),
    ('"Cardiomegaly"', "C", "text"),
    # separators and decorations a model writes around one option (the reviewer's list)
    ("B - Pneumothorax", "B", "letter+text"), ("B – Pneumothorax", "B", "letter+text"),
    ("(B). Pneumothorax", "B", "letter+text"), ("(B): Pneumothorax", "B", "letter+text"),
    ("B (Pneumothorax)", "B", "letter+text"), ("B.) Pneumothorax", "B", "letter+text"),
    ("The answer: B", "B", "letter"), ("Correct answer: B", "B", "letter"), ("Options: B", "B", "letter"),
    ("b)", "B", "letter"), ("Ｂ", "B", "letter"), ("B。", "B", "letter"), ("ｐｎｅｕｍｏｔｈｏｒａｘ", "B", "text"),
])
def test_strict_reads_one_option(prediction, letter, how):
    assert strict_choice(prediction, OPTS) == (letter, how)


@pytest.mark.parametrize("prediction, how", [
    ("A and B", "contradiction"),  # two options: wrong, not the first
    ("not A", "none"),
    ("A or C", "contradiction"),
    ("B. Cardiomegaly", "contradiction"),  # the letter of one option, the text of another
    ("The image shows a pneumothorax on the left", "none"),  # the option text inside a sentence
    ("There is pleural effusion and cardiomegaly", "none"),
    ("E", "none"),  # not an option
    ("a small pneumothorax", "none"),  # a lower-case article is not the letter A
    ("", "none"), ("   ", "none"), (".", "none"),
    ("AB", "none"),
    ("Answering B", "none"),  # "Answer" is a prefix only as a whole word
    ("B - Cardiomegaly", "contradiction"),
])
def test_strict_refuses_what_is_not_one_option(prediction, how):
    assert strict_choice(prediction, OPTS) == (None, how)


def test_option_text_that_looks_like_a_prefix_or_letter():
    opts = {"A": "Choice of antibiotics", "B": "A fracture", "C": "C"}
    assert strict_choice("Choice of antibiotics", opts) == ("A", "text")  # 'Choice' is not stripped from a text
    assert strict_choice("A fracture", opts) == ("B", "text")  # option B's text, not letter A + noise
    assert strict_choice("C", opts) == ("C", "letter")
    dup = {"A": "Yes", "B": "yes", "C": "No"}
    assert strict_choice("yes", dup) == (None, "none")  # the text of two options chooses neither


def test_option_texts_that_start_like_separators_or_prefixes():
    """The second review's cases: what follows a letter is compared as written before any separator is dropped,
    so an option text starting with "-" or "(" reads right, and another option's text is a contradiction."""
    opts = {"A": "-5 mmHg", "B": "5 mmHg", "C": "(i) and (ii)", "D": "Answer unknown", "E": "unknown"}
    assert strict_choice("A. -5 mmHg", opts) == ("A", "letter+text")
    assert strict_choice("B. -5 mmHg", opts) == (None, "contradiction")  # letter B, text of A
    assert strict_choice("B - 5 mmHg", opts) == ("B", "letter+text")
    assert strict_choice("C. (i) and (ii)", opts) == ("C", "letter+text")
    assert strict_choice("Answer unknown", opts) == ("D", "text")  # the whole text first, not "unknown"
    assert strict_choice("unknown", opts) == ("E", "text")


def test_a_stated_answer_whose_text_holds_a_period():
    """"The answer is C. difficile": extract_answer stops at the first period ("C"); the rest of that line is
    exactly option D, so D is read; a stated letter with a sentence after it stays the letter."""
    opts = {"A": "Pleural effusion", "B": "Pneumothorax", "C": "Vitamin B", "D": "C. difficile"}
    raw = "Given the colitis, the answer is C. difficile"
    q = score_choice(1, "q", opts, "D", extract_answer(raw), raw=raw)
    assert q.choice == "D" and q.correct and q.how == "text"
    raw = "The answer is C. Vitamin B deficiency explains the findings."
    assert score_choice(2, "q", opts, "C", extract_answer(raw), raw=raw).choice == "C"
    raw = "<think>the answer is C. difficile?</think><answer>A</answer>"
    assert score_choice(3, "q", opts, "A", extract_answer(raw), raw=raw).choice == "A"  # tags win


def test_reasoning_outputs_are_scored_on_their_answer():
    think = "<think>A looks possible, and C is tempting, but the rim sign means B</think><answer>B</answer>"
    assert strict_choice(extract_answer(think), OPTS) == ("B", "letter")
    assert strict_choice(extract_answer("<think>not A, not C</think> (B) Pneumothorax"), OPTS) == ("B", "letter+text")
    assert strict_choice(extract_answer("Looking at the apex... The answer is C."), OPTS) == ("C", "letter")
    q = score_choice(1, "q", OPTS, "B", extract_answer(think), raw=think)
    assert q.correct and q.raw == think and q.prediction == "B"


def test_mmmu_parse_choice_rules():
    opts = {"A": "0.5 mg", "B": "1 mg", "C": "2 mg", "D": "5 mg"}
    assert mmmu_parse_choice("(B)", opts) == ("B", False)
    assert mmmu_parse_choice("B", opts) == ("B", False)  # padded with spaces: " B "
    assert mmmu_parse_choice("B.", opts) == ("B", False)  # '.' stripped from the ends
    # bracketed letters: the last one written wins, even after "not" (MMMU's rule; the strict rule refuses it)
    assert mmmu_parse_choice("The answer is (C), not (A).", opts) == ("A", False)
    assert mmmu_parse_choice("I pick A or maybe D here", opts) == ("D", False)  # two bare letters: the last
    # no letter: more than 5 words -> option texts found in the response, the last occurring wins
    assert mmmu_parse_choice("the dose should be 2 mg per day overall", opts) == ("C", False)
    assert mmmu_parse_choice("i think 1 mg then 5 mg is right", opts) == ("D", False)
    # 5 words or fewer and no letter: a random pick, the same for the same question id
    pick, rand = mmmu_parse_choice("two milligrams", opts, seed="q7")
    assert rand and pick in opts and mmmu_parse_choice("two milligrams", opts, seed="q7")[0] == pick
    # the strict rule refuses what MMMU's rule accepts
    assert strict_choice("I pick A or maybe D here", opts)[0] is None


def test_mmmu_open_parsing():
    assert mmmu_normalize("1,234.567") == [1234.57]
    assert mmmu_normalize("B") == [" b", "b "]
    # their three patterns in turn (thousands, scientific, plain); the plain one also finds pieces of the others
    assert mmmu_extract_numbers("dose 1,200 mg or 3.5e-3 then 42") == ["1,200", "3.5e-3", "200", "3", "-3", "42"]
    # a number glued to its unit is not a number to MMMU (a word boundary ends a plain number)
    assert not mmmu_open_correct(["5"], mmmu_parse_open("The answer is 5mg"))
    assert mmmu_open_correct(["5"], mmmu_parse_open("The answer is 5 mg"))
    parsed = mmmu_parse_open("The volume is 24.0 ml")
    assert 24.0 in parsed and "24.0 ml" in parsed
    assert mmmu_open_correct(["24"], parsed)
    assert not mmmu_open_correct(["25"], parsed)
    assert mmmu_open_correct(["mitral valve"], mmmu_parse_open("So the lesion is in the mitral valve."))
    # MMMU lower-cases before splitting into sentences, so only newlines split
    # (the last "is " of the one sentence; a one-letter answer is kept with a space on either side)
    assert mmmu_parse_open("First is x. Then is yes") == ["yes"]
    assert mmmu_parse_open("a = 3\nanswer 4") == [4.0]  # "= 3" only counts in the last line


def test_aggregate_breakdown_and_compat():
    qs = [score_choice(i, "q", OPTS, ans, pred, categories={"modality": mod}, raw=pred, mmmu=True)
          for i, (ans, pred, mod) in enumerate([("A", "A", "CT"), ("B", "C", "CT"), ("B", "A and B", "MR"),
                                                ("D", "no finding", "MR")])]
    r = aggregate_choice(qs)
    assert r["accuracy"] == 0.5 and r["num_questions"] == 4 and r["num_correct"] == 2
    assert r["answered_rate"] == 0.75 and r["unanswered_by"]["contradiction"] == 1
    assert r["answered_by"] == {"letter": 2, "letter+text": 0, "text": 1}
    # MMMU: "A and B" -> the last bare letter, B (right); "no finding" (2 words) -> no candidate, a random pick
    assert qs[2].compat_choice == "B" and qs[2].compat
    assert r["compat"]["mmmu"]["num_random"] == 1
    b = breakdown_choice(qs)
    assert b["modality"]["CT"] == {"n": 2, "accuracy": 0.5} and b["modality"]["MR"] == {"n": 2, "accuracy": 0.5}


def test_open_questions_strict_and_mmmu():
    q = score_choice("x", "How many?", {}, "6", "6", kind="open", answers=["6", "six"], raw="6", mmmu=True)
    assert q.correct and q.compat and q.kind == "open"
    q = score_choice("y", "How many?", {}, "6", "There are 6 lesions", kind="open", answers=["6"],
                     raw="There are 6 lesions", mmmu=True)
    assert not q.correct and q.compat  # strict wants the answer alone; MMMU finds the number


def test_hostile_outputs_score_in_linear_time():
    """A model that repeats a tag or punctuation for its whole budget: each form was quadratic once (a regex
    rescanning from every unclosed <answer>, a trailing-punctuation loop copying the string per character);
    a megabyte now takes well under a second (the bound is loose for loaded machines; quadratic took minutes)."""
    import time

    from vlm.grpo import answer_format

    for text in ("<answer>" * 125_000, "The answer is x" + " " * 1_000_000 + "y", "B" + "." * 1_000_000, "B" + ".'" * 500_000, "the answer is " * 70_000,
                 "A " * 500_000, "(A) " * 250_000):
        t0 = time.perf_counter()
        answer = extract_answer(text)
        answer_format(text)
        strict_choice(answer, OPTS)
        mmmu_parse_choice(text, OPTS, seed=0)
        assert time.perf_counter() - t0 < 10, text[:20]
    assert strict_choice("B" + "." * 1_000_000, OPTS) == ("B", "letter")
