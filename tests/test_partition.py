import numpy as np
import pytest

from dpfl.shared.data.partition import partition
from dpfl.shared.errors import ConfigError

LABELS = np.repeat(np.arange(10), 50)


def _check_exact_cover(parts, n):
    allidx = np.concatenate(parts)
    assert len(allidx) == n and len(np.unique(allidx)) == n  # disjoint and complete


@pytest.mark.parametrize("scheme", ["iid", "class", "dirichlet"])
@pytest.mark.parametrize("clients", [1, 3, 7, 12])
def test_disjoint_complete_seeded(scheme, clients):
    parts = partition(LABELS, clients, scheme, seed=3, alpha=0.3)
    assert len(parts) == clients
    _check_exact_cover(parts, len(LABELS))
    again = partition(LABELS, clients, scheme, seed=3, alpha=0.3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def test_iid_sizes_balanced():
    sizes = [len(p) for p in partition(LABELS, 3, "iid")]
    assert max(sizes) - min(sizes) <= 1


def test_by_class_never_shares_a_class_when_classes_suffice():
    parts = partition(LABELS, 3, "class", seed=1)
    owners = [set(LABELS[p]) for p in parts]
    assert not (owners[0] & owners[1]) and not (owners[1] & owners[2])


def test_dirichlet_skew_depends_on_alpha():
    def skew(alpha):
        parts = partition(LABELS, 5, "dirichlet", seed=0, alpha=alpha)
        return np.mean([np.bincount(LABELS[p], minlength=10).max() / len(p) for p in parts])
    assert skew(0.05) > skew(100.0) + 0.2


def test_different_seeds_differ():
    a = partition(LABELS, 3, "iid", seed=0)
    b = partition(LABELS, 3, "iid", seed=1)
    assert not np.array_equal(a[0], b[0])


def test_bad_arguments():
    with pytest.raises(ConfigError):
        partition(LABELS, 0, "iid")
    with pytest.raises(ConfigError, match="alpha"):
        partition(LABELS, 3, "dirichlet", alpha=0)
    with pytest.raises(ConfigError, match="scheme"):
        partition(LABELS, 3, "zipf")
