from conftest import REPO
from data_prep.concepts import ConceptTagger
from vlm.data.concepts import Concept, VocabularyConfig

import pytest


@pytest.fixture(scope="module")
def tagger():
    return ConceptTagger.from_file(REPO / "configs/concepts/medical.yaml")


def spans(tagger, text):
    return [(c["name"], text[c["span"][0]:c["span"][1]], c.get("negated", False)) for c in tagger.tag(text)]


def test_spans_longest_match_and_synonyms(tagger):
    text = "Frontal chest radiograph: a small nodule in the right upper lung."
    assert spans(tagger, text) == [("chest x-ray", "Frontal chest radiograph", False), ("small", "small", False),
                                   ("nodule", "nodule", False), ("right", "right", False),
                                   ("upper", "upper", False), ("lung", "lung", False)]


def test_whole_words_only_and_case(tagger):
    assert spans(tagger, "Massive CT") == [("computed tomography", "CT", False)]
    assert spans(tagger, "massmass") == []


def test_negation_within_clause(tagger):
    out = spans(tagger, "No pleural effusion. A mass but no cyst; nodule.")
    assert out == [("effusion", "pleural effusion", True), ("mass", "mass", False), ("cyst", "cyst", True),
                   ("nodule", "nodule", False)]


def test_vocabulary_rejects_shared_terms_and_bad_cui():
    with pytest.raises(ValueError, match="belongs to both"):
        VocabularyConfig(concepts=[Concept("a", synonyms=["x"]), Concept("b", synonyms=["x"])])
    with pytest.raises(ValueError, match="CUI"):
        Concept("a", cui="12345")
