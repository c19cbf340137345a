"""VQA metrics against hand-computed cases, including the known traps of the published protocol."""
import pytest

from eval.metrics import (aggregate, choice_options, closed_correct, llava_med_exact_match, llava_med_f1,
                          llava_med_normalize_word, llava_med_scores, normalize, score_question, token_f1,
                          token_recall)


# --- strict metrics ----------------------------------------------------------------------------

def test_normalize():
    assert normalize("The Left Lung, mostly.") == "left lung mostly"
    assert normalize("3.5 cm") == "3.5 cm" and normalize("1,000 ml") == "1000 ml"
    assert normalize("Two nodules") == "2 nodules"
    assert normalize("none") == "none"  # unlike LLaVA-Med, 'none' is not the number 0
    assert normalize("") == ""


@pytest.mark.parametrize("answer,prediction,correct", [
    ("no", "normal", False),  # the substring trap: 'no' inside 'normal'
    ("no", "No, the heart is normal.", True),
    ("yes", "Yes.", True),
    ("yes", "There is no sign; yes it might be", False),  # the first yes/no word decides
    ("no", "", False),
    ("No", "nope", False),
])
def test_closed_yes_no_strict(answer, prediction, correct):
    assert closed_correct("Is this normal?", answer, prediction) is correct


def test_choice_questions():
    q = "Which is bigger in this image, the liver or the right kidney?"
    assert choice_options(q) == ["liver", "right kidney"]
    assert closed_correct(q, "Liver", "The liver is bigger.")
    assert not closed_correct(q, "Liver", "liver or right kidney")  # names both options
    assert not closed_correct(q, "Liver", "the kidney")
    assert closed_correct("Is it a CT or an MRI?", "MRI", "mri")
    assert closed_correct("Where is the abnormality, left or right lung?", "Left Lung", "left lung")
    assert not closed_correct("Where is the abnormality, left or right lung?", "Left Lung", "right lung")


def test_open_metrics_hand_computed():
    # answer 'left lung' vs prediction 'the lung on the left': tokens [lung, on, left]
    assert token_recall("left lung", "the lung on the left") == 1.0
    assert token_f1("left lung", "the lung on the left") == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    # repeated words count once against a single reference word
    assert token_f1("lung", "lung lung lung") == pytest.approx(0.5)
    assert token_recall("lung", "") == 0.0 and token_f1("lung", "") == 0.0


def test_aggregate_keys_and_values():
    qs = [score_question(1, "Is there a mass?", "yes", "yes", "CLOSED"),
          score_question(2, "Is it normal?", "no", "normal", "CLOSED"),
          score_question(3, "Which organ?", "left lung", "left lung", "OPEN"),
          score_question(4, "What modality?", "CT", "MRI", "OPEN")]
    r = aggregate(qs)
    assert (r["num_open"], r["num_closed"]) == (2, 2)
    assert r["closed_accuracy"] == 0.5 and r["exact_match"] == 0.5 and r["open_recall"] == 0.5
    assert r["llava_med"]["closed_accuracy"] == 1.0  # 'no' in 'normal' counts there
    assert r["llava_med"]["open_recall"] == 0.5


# --- LLaVA-Med v1, rule for rule -----------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("no, it is normal.", "no it is normal"),  # ', ' present: ',' removed; final '.' removed
    ("x-ray (left)", "x ray left"),  # '-' -> space; ' (' present -> '(' removed; ')' -> space
    ("a (b) c", "b c"),  # both parentheses touch spaces -> removed; article 'a' dropped
    ("3.5cm lesion.", "3.5cm lesion"),  # a period before a digit stays
    ("1,000/2", "10002"),  # a digit-comma-digit anywhere: every punctuation mark is deleted
    ("two or none", "2 or 0"),  # number words, and 'none' -> '0'
    ("isnt it", "isn't it"),  # contractions
    ("the left lung", "left lung"),
    ("." * 40, "." * 8),  # re.UNICODE passed as count: only 32 periods go
])
def test_llava_med_normalize_word(text, expected):
    assert llava_med_normalize_word(text) == expected


def test_llava_med_exact_match_is_a_precision():
    assert llava_med_exact_match("lung lung lung", "lung") == pytest.approx(1 / 3)
    assert llava_med_exact_match("left lung", "left lung") == 1.0
    assert llava_med_exact_match("", "lung") == 0.0


def test_llava_med_f1_counts_candidate_multiplicity():
    assert llava_med_f1("lung lung lung", "lung") == (1.0, 1.0, 1.0)
    f1, p, r = llava_med_f1("lung on left", "left lung")
    assert (p, r) == (pytest.approx(2 / 3), 1.0) and f1 == pytest.approx(0.8)
    assert llava_med_f1("", "lung") == (0.0, 0.0, 0.0)
    assert llava_med_f1("heart", "lung") == (0.0, 0.0, 0.0)


def test_llava_med_scores_traps():
    assert llava_med_scores("no", "normal", "CLOSED") == {"hit": 1.0}
    assert llava_med_scores("yes", "", "CLOSED") == {"hit": 0.0}
    s = llava_med_scores("Two", "there are 2 lesions", "OPEN")
    assert s["hit"] == 1.0 and s["recall"] == 1.0 and s["exact"] == pytest.approx(1 / 4)
    s = llava_med_scores("Left Lung", "The lung on the left.", "OPEN")
    assert s["hit"] == 0.0 and s["recall"] == 1.0 and s["f1"] == pytest.approx(0.8)
