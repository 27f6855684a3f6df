"""What `mmpr train` reports at the end: whether the loss fell, and the held-out
reward accuracy overall and per pair type. Pure bookkeeping, so plain tensors and tables suffice."""

import pyarrow as pa
import torch

from mmpr_pipeline.train.cli import learning_report
from mmpr_pipeline.train.evaluation import pair_types_of, tally_by_type


def test_tally_by_type_counts_positive_margins_per_pair_type():
    table = pa.table({"pair_type": ["correctness", "dropout_ntp", "correctness", "format"]})
    types = pair_types_of(table)
    assert types == ["correctness", "dropout_ntp", "format"]
    # batch rows are table rows 2, 0, 1, 3; a zero margin is not a win (chosen must beat rejected)
    counts = tally_by_type(torch.tensor([0.5, -0.1, 0.2, 0.0]), torch.tensor([2, 0, 1, 3]), table, types)
    assert counts.tolist() == [[1.0, 2.0], [1.0, 1.0], [0.0, 1.0]]


def test_pair_types_of_a_table_without_the_column_is_empty():
    assert pair_types_of(pa.table({"question": ["q"]})) == []


def test_learning_report_says_whether_the_loss_fell_and_prints_each_pair_type():
    last_eval = {
        "eval_pairs": 10,
        "eval_reward_accuracy": 0.8,
        "eval_reward_accuracy_correctness": 0.75,
        "eval_pairs_correctness": 8,
        "eval_reward_accuracy_dropout_ntp": 1.0,
        "eval_pairs_dropout_ntp": 2,
    }
    falling = learning_report([1.2, 1.0, 1.1, 0.9, 0.8, 0.7, 0.6, 0.5], last_eval).splitlines()
    assert falling[0] == ("train loss: 1.1000 (first quarter of 8 steps) -> 0.5500 (last quarter), falling")
    assert falling[1] == (
        "held-out reward accuracy: 0.800 on 10 pairs (chance 0.5); by pair type: "
        "correctness 0.750 (8 pairs), dropout_ntp 1.000 (2 pairs)"
    )
    assert learning_report([0.5, 0.9], last_eval).splitlines()[0].endswith("NOT falling")
