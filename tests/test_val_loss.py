"""val_loss is the plain cross-entropy of the validation split, whatever the training loss's
label smoothing (loop.evaluate's docstring, docs): validation losses compare across
``trainer.label_smoothing``."""
import csv

import torch
import torch.nn.functional as F

from conftest import SYNTHETIC_96_VAL_40, compose_config

EPS = 0.4
SMOOTHED = [*SYNTHETIC_96_VAL_40, f"trainer.label_smoothing={EPS}"]


def test_val_loss_is_plain_cross_entropy_with_label_smoothing_on(tmp_path, monkeypatch):
    """A spy around the runner's validation pass recomputes, on the same model and loader at
    that moment, the plain and the smoothed cross-entropy: the val_loss the pass returns and
    the one epochs.csv records are the plain one (and the two differ by a hundred times the
    tolerance, so a smoothed val_loss cannot pass)."""
    from octconv_exp.training import runner

    real = runner.validate_epoch
    seen = []

    def spy(backend, model, loader, *args, **kwargs):
        accuracy, images, loss = real(backend, model, loader, *args, **kwargs)
        training = model.training
        model.eval()
        plain = smoothed = 0.0
        count = 0
        with torch.no_grad():
            for data, labels in loader:
                out = model(data).float()
                plain += F.cross_entropy(out, labels, reduction="sum").item()
                smoothed += F.cross_entropy(out, labels, reduction="sum",
                                            label_smoothing=EPS).item()
                count += len(labels)
        model.train(training)
        seen.append((loss, plain / count, smoothed / count, images, count))
        return accuracy, images, loss

    monkeypatch.setattr(runner, "validate_epoch", spy)
    cfg = compose_config(*SMOOTHED)
    runner.run_experiment(cfg, str(tmp_path / "run"))
    assert len(seen) == 2  # one validation pass an epoch
    for loss, plain, smoothed, images, count in seen:
        assert images == count == 40
        tolerance = 1e-5 * max(1.0, plain)
        assert abs(smoothed - plain) > 100 * tolerance
        assert abs(loss - plain) < tolerance
    with open(tmp_path / "run" / "epochs.csv") as f:
        recorded = [float(row["val_loss"]) for row in csv.DictReader(f)]
    assert len(recorded) == 2
    for value, (loss, *_) in zip(recorded, seen):
        assert abs(value - loss) < 1e-5 * max(1.0, loss)
