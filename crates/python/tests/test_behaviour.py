"""What a Python caller relies on: the GIL released, progress, cancelling, exceptions."""

from __future__ import annotations

import _thread
import os
import signal
import threading
import time

import pytest

import convcache
from conftest import leftovers, outputs, write_safetensors


def test_the_gil_is_released_while_converting(models, big_model):
    ticks = []
    done = threading.Event()

    def count():
        while not done.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.001)

    # Warm the page cache so that the conversion's own time is what is measured.
    convcache.detect(big_model)
    t = threading.Thread(target=count)
    t.start()
    time.sleep(0.01)
    started = time.perf_counter()
    # Q4_K_M: its scale search keeps the cores busy for long enough to watch.
    path, new = convcache.smart_convert(big_model, "Q4_K_M", models_dir=models)
    ended = time.perf_counter()
    done.set()
    t.join()
    assert new
    during = [x for x in ticks if started < x < ended]
    # The other thread ran all along, not only before and after.
    assert ended - started > 0.2, "the conversion was too quick to tell"
    assert len(during) > 20, (len(during), ended - started)
    gaps = [b - a for a, b in zip([started] + during, during + [ended])]
    assert max(gaps) < (ended - started) / 2, max(gaps)


def test_progress_is_called_throttled_and_in_order(models, big_model):
    calls = []
    path, new = convcache.smart_convert(
        big_model, "fp16", models_dir=models, progress=lambda d, t, s: calls.append((time.perf_counter(), d, t, s))
    )
    assert new
    stages = []
    for _, _, _, s in calls:
        if not stages or stages[-1] != s:
            stages.append(s)
    assert stages[0] == "planning" and "converting" in stages and stages[-1] == "publishing", stages
    conv = [(at, d, t) for at, d, t, s in calls if s == "converting"]
    total = conv[-1][2]
    assert total == os.path.getsize(big_model) or total > 100 << 20
    assert conv[-1][1] == total, "the stage's last call reports it complete"
    assert all(a[1] <= b[1] for a, b in zip(conv, conv[1:])), "bytes done never decrease"
    # Throttled: after the stage's first call, calls before completion are ~0.1 s apart.
    middle = [c for c in conv[1:] if c[1] < c[2]]
    gaps = [b[0] - a[0] for a, b in zip(middle, middle[1:])]
    # The converter reports every 2 MiB chunk (~100 here); the callback sees about one call
    # per 0.1 s, plus the stage's first and its completion.
    span = conv[-1][0] - conv[0][0]
    assert len(conv) <= span / 0.1 + 4, (len(conv), span)
    assert min(gaps, default=1) >= 0.09, gaps


def _assert_nothing_published(models):
    assert outputs(models) == []
    assert leftovers(models) == []


def test_progress_returning_false_cancels(models, big_model):
    seen = []

    def progress(done, total, stage):
        seen.append(stage)
        return False if stage == "converting" and done > 0 else None

    with pytest.raises(convcache.Cancelled) as e:
        convcache.smart_convert(big_model, "fp16", models_dir=models, progress=progress)
    assert "flux_big" in str(e.value) and "cancelled" in str(e.value)
    assert "publishing" not in seen
    _assert_nothing_published(models)
    # The next call converts normally.
    path, new = convcache.smart_convert(big_model, "fp16", models_dir=models)
    assert new and os.path.isfile(path)


def _cancel_after_a_checkpoint(monkeypatch):
    """A progress callback that cancels once a resume checkpoint was journaled (a checkpoint
    at every piece boundary: `CONVCACHE_CHECKPOINT_MS=0`, read when the conversion starts)."""
    monkeypatch.setenv("CONVCACHE_CHECKPOINT_MS", "0")

    def progress(done, total, stage):
        return False if stage == "converting" and 0 < done < total else None

    return progress


def _journals(models):
    return [os.path.join(r, f) for r, _d, fs in os.walk(models) for f in fs if f.endswith(".journal")]


def test_cancel_removes_even_a_journaled_temporary(models, big_model, monkeypatch):
    with pytest.raises(convcache.Cancelled):
        convcache.smart_convert(big_model, "Q4_K_M", models_dir=models, progress=_cancel_after_a_checkpoint(monkeypatch))
    _assert_nothing_published(models)
    assert _journals(models) == []


def test_keep_partial_keeps_a_cancelled_conversion_for_the_next_call(models, big_model, tmp_path, monkeypatch):
    with pytest.raises(convcache.Cancelled):
        convcache.smart_convert(
            big_model, "Q4_K_M", models_dir=models, progress=_cancel_after_a_checkpoint(monkeypatch), keep_partial=True
        )
    assert outputs(models) == []
    assert len(leftovers(models)) == 1 and len(_journals(models)) == 1
    path, new = convcache.smart_convert(big_model, "Q4_K_M", models_dir=models)
    assert new and leftovers(models) == [] and _journals(models) == []
    clean, _ = convcache.smart_convert(big_model, "Q4_K_M", models_dir=tmp_path / "clean")
    # Q4_K_M (slow enough for progress calls between the first and the last); the resumed
    # file is the uninterrupted one, byte for byte (provenance included: same source).
    with open(path, "rb") as a, open(clean, "rb") as b:
        assert a.read() == b.read()


def test_an_exception_in_progress_cancels_and_propagates(models, big_model):
    def progress(done, total, stage):
        if stage == "converting" and done > 0:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        convcache.smart_convert(big_model, "bf16", models_dir=models, progress=progress)
    _assert_nothing_published(models)


def _interrupt_once_converting(how):
    fired = []

    def progress(done, total, stage):
        if stage == "converting" and done > 0 and not fired:
            fired.append(True)
            how()
            # Give the waiting thread time to see the signal while the conversion still runs.
            time.sleep(0.3)

    return progress


@pytest.mark.parametrize(
    "how",
    [_thread.interrupt_main, lambda: os.kill(os.getpid(), signal.SIGINT)],
    ids=["interrupt_main", "SIGINT"],
)
def test_keyboard_interrupt_cancels_cleanly(models, big_model, how):
    assert threading.current_thread() is threading.main_thread()
    with pytest.raises(KeyboardInterrupt):
        convcache.smart_convert(big_model, "nf4", models_dir=models, progress=_interrupt_once_converting(how))
    _assert_nothing_published(models)


def test_keyboard_interrupt_from_a_timer(models, big_model):
    # No callback: a timer thread interrupts the main thread while the conversion runs.
    timer = threading.Timer(0.15, _thread.interrupt_main)
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            convcache.smart_convert(big_model, "Q4_K_M", models_dir=models)
    finally:
        timer.cancel()
    _assert_nothing_published(models)


def test_source_errors_name_the_file(models, tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(convcache.SourceError, match="nope.safetensors: no such file"):
        convcache.smart_convert(missing, "fp16", models_dir=models)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    for call in [
        lambda: convcache.smart_convert(garbage, "fp16", models_dir=models),
        lambda: convcache.detect(garbage),
        lambda: convcache.detect_model_precision(garbage),
        lambda: convcache.batch_check_conversions(garbage, ["fp16"], models_dir=models),
        lambda: convcache.should_skip_conversion(garbage, "fp16"),
    ]:
        with pytest.raises(convcache.SourceError) as e:
            call()
        assert "garbage.safetensors" in str(e.value)
        assert isinstance(e.value, convcache.ConvcacheError)
    _assert_nothing_published(models)


def test_a_target_the_source_cannot_become_is_a_source_error(models, small_model):
    q, _ = convcache.smart_convert(small_model, "nf4", models_dir=models)
    # bitsandbytes to GGUF is not a conversion convcache makes (or the other way round).
    with pytest.raises(convcache.SourceError) as e:
        convcache.smart_convert(q, "Q4_K_M", models_dir=models)
    assert "flux_small_nf4" in str(e.value)


def test_a_failed_conversion_is_a_conversion_error(models, small_model):
    # The output dir cannot be created: a file stands where it should be.
    (models / "diffusion_models" / "converted").write_text("in the way")
    with pytest.raises(convcache.ConversionError) as e:
        convcache.smart_convert(small_model, "fp16", models_dir=models)
    assert "converted" in str(e.value)
    assert not isinstance(e.value, convcache.SourceError)


def test_bad_arguments_are_value_and_type_errors(models, small_model):
    with pytest.raises(ValueError, match="fp9"):
        convcache.smart_convert(small_model, "fp9", models_dir=models)
    with pytest.raises(ValueError, match="conversion_type"):
        convcache.list_converted_models("pickles", models_dir=models)
    with pytest.raises(TypeError):
        convcache.smart_convert(small_model, "fp16", models_dir=models, progress=42)
    with pytest.raises(TypeError):
        convcache.smart_convert(12, "fp16", models_dir=models)


def test_exception_hierarchy():
    for cls in (convcache.SourceError, convcache.ConversionError, convcache.Cancelled):
        assert issubclass(cls, convcache.ConvcacheError)
    assert issubclass(convcache.ConvcacheError, Exception)
    assert convcache.ConvcacheError.__module__ == "convcache"
