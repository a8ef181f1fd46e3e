"""The evaluate stage's sample sets and table, Ray-free: the unselected set is the first drawn of each class,
rejection ranks by the network it is given (not the one that grades), capped sets and the table hold what
their names say."""
import numpy as np

from pipeline.metrics.subsets import balanced_indices
from stages.evaluate import evaluation_table
from stages.evaluate.reconstruction import disjoint_set
from stages.evaluate.samples import first_per_class, rejection


def test_first_per_class_takes_the_earliest_draws_of_every_class():
    labels = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
    assert first_per_class(labels, 2).tolist() == [0, 1, 3, 4, 6, 7]
    shuffled = np.array([2, 0, 1, 0, 2, 1, 0, 1, 2])
    chosen = first_per_class(shuffled, 1)
    assert chosen.tolist() == [0, 1, 2] and sorted(shuffled[chosen]) == [0, 1, 2]


def test_rejection_ranks_by_the_scores_it_is_given_per_class():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    ranking = np.zeros((8, 2))
    ranking[np.arange(8), labels] = [0.1, 0.9, 0.5, 0.7, 0.8, 0.2, 0.6, 0.3]
    kept = rejection(ranking, labels, 2)
    assert kept.tolist() == [1, 3, 4, 6]
    # Another network's scores choose other samples: rejection follows the ranking network alone.
    other = ranking.copy()
    other[np.arange(8), labels] = [0.9, 0.1, 0.8, 0.2, 0.1, 0.9, 0.2, 0.8]
    assert rejection(other, labels, 2).tolist() == [0, 2, 5, 7]
    # Ties keep draw order, so the same draws always give the same set.
    assert rejection(np.full((8, 2), 0.5), labels, 2).tolist() == [0, 1, 4, 5]


def test_the_table_puts_each_set_and_its_floor_in_its_own_column():
    metrics = {"fid_domain": 12.5, "fid_domain_accepted": 9.25, "fid_domain_floor": 3.0, "acceptance_rate": 0.5,
               "rfid_domain": 4.0, "rfid_domain_floor": 1.5}
    table = evaluation_table(metrics)
    assert "| FID (domain) | 12.5 | 9.25 | 3 |" in table
    assert "| rFID (domain) | 4 | 1.5 |" in table
    assert "| FID (Inception) | n/a | n/a | n/a |" in table and "kept / drawn): 0.5" in table


def test_the_floor_set_is_disjoint_from_the_reference_and_balanced():
    labels = np.random.default_rng(3).permutation(np.repeat(np.arange(5), 30))
    reference = balanced_indices(labels, 100, seed=0)  # 20 of each class
    floor = disjoint_set(labels, 50, seed=1, exclude=reference)
    assert len(np.intersect1d(floor, reference)) == 0 and len(floor) == 50
    assert np.bincount(labels[floor]).tolist() == [10] * 5
    assert disjoint_set(labels, 55, seed=1, exclude=reference) is None  # 11 per class: only 10 are left
    assert disjoint_set(labels, 50, seed=1, exclude=np.arange(len(labels))) is None
