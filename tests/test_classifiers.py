"""DPImageBench's three downstream classifiers at CPU size (ResNet-8, WRN-10-2, ResNeXt-11),
the one training loop they share with the CNN, and the 3-classifier mean in the results
record."""

import numpy as np
import pytest
import torch

from dpfl.shared.data.readers import ImageSet
from dpfl.shared.errors import ConfigError, DataError
from dpfl.shared.eval.classifiers import (
    CLASSIFIER_SETS,
    CLASSIFIERS,
    MEAN3,
    ResNet,
    ResNeXt,
    WideResNet,
    build,
    mean3,
    parameter_count,
)
from dpfl.shared.eval.cnn import TrainSettings, predict_logits, train_classifier, train_cnn
from dpfl.shared.eval.evaluate import EvalConfig, downstream_accuracy, mean3_accuracy
from dpfl.shared.eval.record import ResultRecord

# hand-counted for 1 input channel and 10 classes (weights + BatchNorm affine + head):
# ResNet-8: stem 144 + 32; stage 1 (stride 2, 1x1 projection) 2*2304 + 64 + 256 + 32 = 4,960;
# stage 2: 4,608 + 9,216 + 128 + 512 + 64 = 14,528; stage 3: 18,432 + 36,864 + 256 + 2,048
# + 128 = 57,728; head 650  ->  78,042
PARAMETERS = {"resnet": 78_042, "wrn": 303_418, "resnext": 41_786, "cnn": 155_786}


def _easy(n, seed, classes=4):
    """Class c is a bright 10x10 square in quadrant c on faint noise: trivially separable."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    x = rng.random((n, 28, 28, 1)).astype(np.float32) * 0.3
    for i, c in enumerate(y):
        r, col = divmod(int(c), 2)
        x[i, 2 + 14 * r:12 + 14 * r, 2 + 14 * col:12 + 14 * col] = 0.95
    return ImageSet(x, y.astype(np.int64), tuple(f"c{i}" for i in range(classes)), f"easy-{seed}")


# BatchNorm's running statistics need ~20 updates before eval mode is meaningful
FAST = TrainSettings(epochs=3, batch_size=12, lr=3e-3, val_fraction=0.25, seed=0)


@pytest.mark.parametrize("name", sorted(CLASSIFIERS))
def test_each_classifier_maps_28x28_images_to_class_logits(name):
    model = build(name, 1, 10)
    assert parameter_count(model) == PARAMETERS[name]
    model.eval()
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    rgb = build(name, 3, 7).eval()
    assert rgb(torch.zeros(2, 3, 28, 28)).shape == (2, 7)
    assert rgb(torch.zeros(2, 3, 32, 32)).shape == (2, 7)  # global pooling: any size works


def test_parameter_counts_follow_each_family_and_stay_cpu_sized():
    # one block per stage is the smallest member of each family; n blocks scale the body
    assert parameter_count(ResNet(blocks=3)) > 2.5 * parameter_count(ResNet(blocks=1))
    assert parameter_count(WideResNet(widen=4)) > 3 * parameter_count(WideResNet(widen=2))
    grouped = parameter_count(ResNeXt(cardinality=4))
    assert grouped < parameter_count(ResNeXt(cardinality=1))  # grouping saves 3x3 weights
    assert all(parameter_count(build(n, 1, 10)) < 400_000 for n in MEAN3)
    with pytest.raises(ConfigError, match="cardinality"):
        ResNeXt(cardinality=5)
    with pytest.raises(ConfigError, match="one of"):
        build("vgg", 1, 10)


@pytest.mark.parametrize("name", MEAN3)
def test_each_classifier_learns_a_separable_set_in_a_few_steps(name):
    train, test = _easy(96, 0), _easy(64, 1)
    result = downstream_accuracy(train, test, FAST, classifier=name)
    assert result.accuracy > 0.6  # chance is 0.25
    assert result.classifier == name and result.parameters == parameter_count(build(name, 1, 4))
    assert result.train_size == 72 and result.val_size == 24 and result.test_size == 64
    assert 1 <= result.selected_epoch <= 3 and len(result.history) == 3


def test_the_cnn_trains_through_the_shared_loop_unchanged():
    data = _easy(48, 0)
    settings = TrainSettings(epochs=2, batch_size=16, val_fraction=0.25, seed=3)
    a = train_cnn(data, settings)
    b = train_classifier(data, lambda: build("cnn", 1, 4), settings)
    assert a.history == b.history and a.selected_epoch == b.selected_epoch
    assert torch.equal(predict_logits(a.model, data), predict_logits(b.model, data))
    with pytest.raises(ConfigError, match="SmallCNN"):
        predict_logits(build("resnet", 1, 4), data, features=True)
    with pytest.raises(DataError, match="empty"):
        train_classifier(data.subset(np.array([], dtype=int)), lambda: build("wrn", 1, 4))


def test_mean3_is_the_mean_of_the_three_recorded_accuracies():
    train, test = _easy(64, 0), _easy(40, 1)
    out = mean3_accuracy(train, test, TrainSettings(epochs=1, batch_size=16, val_fraction=0.25))
    members = out["classifiers"]
    assert list(members) == list(MEAN3)
    assert out["accuracy"] == pytest.approx(sum(m["accuracy"] for m in members.values()) / 3)
    assert mean3({"resnet": 0.9, "wrn": 0.6, "resnext": 0.3, "cnn": 0.0}) == pytest.approx(0.6)
    with pytest.raises(DataError, match="missing"):
        mean3({"resnet": 0.9, "wrn": 0.6})


def test_classifier_sets_name_only_registered_classifiers_and_default_to_the_cnn():
    assert CLASSIFIER_SETS["cnn"] == ("cnn",) and set(CLASSIFIER_SETS["all"]) == {"cnn", *MEAN3}
    assert all(n in CLASSIFIERS for names in CLASSIFIER_SETS.values() for n in names)
    assert EvalConfig(model="m").classifiers == "cnn"
    with pytest.raises(ConfigError, match="classifiers must be one of"):
        EvalConfig(model="m", classifiers="mean5")


def _record(**kw):
    base = dict(setting="ceiling", sites=1, epsilon=None, delta=None, seed=0,
                accuracy_cnn=0.88, accuracy_mean3=None, per_class={"a": 0.9}, wall_s=1.0,
                command="dpfl-server experiment", base_model_fingerprint="sha256:00")
    return ResultRecord(**{**base, **kw})


def test_record_with_mean3_round_trips_and_must_agree_with_its_members(tmp_path):
    members = {"resnet": {"accuracy": 0.9}, "wrn": {"accuracy": 0.8},
               "resnext": {"accuracy": 0.7}, "cnn": {"accuracy": 0.88}}
    rec = _record(accuracy_mean3=0.8, extra={"classifiers": members})
    back = ResultRecord.read(rec.write(tmp_path / "r.json"))
    assert back == rec and back.accuracy_mean3 == pytest.approx(0.8)
    old = _record()  # rows written before the three classifiers existed stay readable
    assert ResultRecord.read(old.write(tmp_path / "old.json")).accuracy_mean3 is None
    with pytest.raises(DataError, match="must be the mean"):
        _record(accuracy_mean3=0.85, extra={"classifiers": members})
    with pytest.raises(DataError, match="does not hold an accuracy"):
        _record(accuracy_mean3=0.8)


def test_records_table_shows_the_mean_and_its_three_members(tmp_path):
    from dpfl.shared.eval.record import read_records, records_table

    members = {"resnet": {"accuracy": 0.9}, "wrn": {"accuracy": 0.84},
               "resnext": {"accuracy": 0.81}}
    _record(accuracy_mean3=0.85, extra={"classifiers": members}).write(tmp_path / "a.json")
    _record(setting="ae-ceiling").write(tmp_path / "b.json")
    lines = records_table(read_records(tmp_path)).splitlines()
    assert "| 88.0 % | 85.0 % (resnet 90.0, wrn 84.0, resnext 81.0) |" in lines[2]
    assert "| 88.0 % | - |" in lines[3]
