"""Model classes against dataset labels, matched by name."""

import numpy as np
import pytest

from synthval.data import DatasetIndex, LabelSpace, match_labels


def index_with(label_names):
    return DatasetIndex(root="/data", format="coco", label_names=label_names)


def test_label_space_from_index_is_ordered_by_label_id():
    space = LabelSpace.from_index(index_with({34: "bicycle", 25: " person ", 27: "car"}))
    assert space.names == ("person", "car", "bicycle")
    assert space.num_classes == 4
    assert space.class_ids(index_with({34: "bicycle", 25: "person", 27: "car"})) == {25: 1, 27: 2, 34: 3}


def test_class_ids_map_shared_names_across_numberings():
    space = LabelSpace(("cereal", "milk", "soda"))
    real = index_with({7: "soda", 11: "cereal", 12: "juice", 13: "Milk"})
    assert space.class_ids(real) == {7: 3, 11: 1}  # case-sensitive: "Milk" is not "milk"


def test_match_labels_names_the_unmatched():
    space = LabelSpace(("cereal", "milk", "soda", "tea"))
    match = match_labels(space, index_with({1: "soda", 2: "cereal ", 3: "juice", 4: "Milk"}))
    assert match.shared == ("cereal", "soda")
    assert match.only_in_model == ("milk", "tea")
    assert match.only_in_data == ("juice", "Milk")
    text = match.describe()
    assert "2 of the model's 4 classes match the dataset's 4 labels by name" in text
    assert "'milk', 'tea'" in text and "'juice', 'Milk'" in text
    assert "differ only in case (not matched): 'milk' vs 'Milk'" in text
    assert "\n" not in text


def test_match_labels_all_and_none():
    space = LabelSpace(("a", "b"))
    assert match_labels(space, index_with({5: "b", 9: "a"})).describe() == (
        "All 2 labels match between the model and the dataset by name.")
    none = match_labels(space, index_with({1: "c"}))
    assert none.shared == () and "No label is shared" in none.describe()


def test_label_space_rejects_repeats_and_blanks():
    with pytest.raises(ValueError, match="repeat"):
        LabelSpace(("a", "a "))
    with pytest.raises(ValueError, match="non-empty"):
        LabelSpace(())
    # a dataset naming two ids alike yields one class, and both ids map to it
    index = index_with({1: "a", 2: "a", 3: "b"})
    space = LabelSpace.from_index(index)
    assert space.names == ("a", "b") and space.class_ids(index) == {1: 1, 2: 1, 3: 2}


@pytest.mark.parametrize("n", [12, 400, 4001])
def test_seed_split_is_scikit_learn_s_train_test_split_with_random_state_47(n):
    """datasets/synthetic.py of the seed: train_test_split(catalog, train_size=0.9, random_state=47)."""
    from sklearn.model_selection import train_test_split

    from synthval.data.splits import seed_partition

    train, val = train_test_split(np.arange(n), train_size=0.9, random_state=47)
    ours = seed_partition(n)
    assert ours["seed-train"].tolist() == sorted(train.tolist()) and ours["seed-val"].tolist() == sorted(val.tolist())


def test_blank_and_repeated_labels_are_refused_naming_the_entry():
    from synthval.data.labels import add_label
    from synthval.errors import DatasetError

    names: dict[int, str] = {}
    add_label(names, 1, " cereal ", "defs.json: spec[0]")
    assert names == {1: "cereal"}
    for label_id, name, message in ((2, "", "label id 2 has a blank name"),
                                    (1, "milk", r"label id 1 \('milk'\) is listed twice \(also 'cereal'\)"),
                                    (3, "cereal", r"label name 'cereal' is listed twice \(ids 1 and 3\)")):
        with pytest.raises(DatasetError, match="defs.json: spec\\[1\\]: " + message):
            add_label(names, label_id, name, "defs.json: spec[1]")
