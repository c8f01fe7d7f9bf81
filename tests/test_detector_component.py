"""The detector component without Tango: its condition (state and status) as the DCU and the live
processing change, its settings checked as a whole, a whole acquisition through it."""
from __future__ import annotations

import functools
import threading

import numpy as np
import pytest

from tango_dectris_live.component import (CommandRefused, DetectorAddress, DeviceCondition, DeviceState,
                                          LiveDetector, LiveSettings)
from tango_dectris_live.processing.acquisition import LiveAcquisition, PipelineSettings
from tango_dectris_live.processing.limits import SettingRefused

from .session_fakes import FakeDcu, InMemoryPipelineFactory, InMemoryStream, wait_until


class Listener:
    """Records what the component reports."""

    def __init__(self) -> None:
        self.conditions: list[DeviceCondition] = []
        self.finals = []
        self.catalogues = []
        self.settings: list[LiveSettings] = []
        self.lock = threading.Lock()

    def condition_changed(self, condition):
        with self.lock:
            self.conditions.append(condition)

    def acquisition_updated(self, update):
        if update.final:
            self.finals.append(update)

    def parameters_read(self, catalogue):
        self.catalogues.append(catalogue)

    def parameter_changed(self, module, key, value):
        pass

    def settings_changed(self, settings):
        self.settings.append(settings)

    @property
    def state(self) -> DeviceState:
        return self.conditions[-1].state


@pytest.fixture(scope="module")
def component(tmp_path_factory):
    stream = InMemoryStream(tmp_path_factory.mktemp("frames"))
    dcu = FakeDcu(stream)
    listener = Listener()
    factory = functools.partial(LiveAcquisition, pipeline_factory=InMemoryPipelineFactory(stream))
    detector = LiveDetector(DetectorAddress("fake-dcu", poll_period=0.05), listener, client=dcu,
                            settings=LiveSettings(tuning=PipelineSettings(workers=1)), acquisition_factory=factory)
    detector.start()
    try:
        yield detector, dcu, listener
    finally:
        detector.close()


def test_idle_dcu_reads_its_parameters_and_is_on(component):
    detector, _dcu, listener = component
    wait_until(lambda: listener.conditions and listener.state == DeviceState.ON, 30, "State ON")
    status = listener.conditions[-1].status
    assert "detector idle" in status and "Live processing (idle)" in status
    assert "The DCU does not provide: detector/config/keys" in status  # the fake lists no keys
    names = {info.key for info in listener.catalogues[-1].parameters}
    assert {"nimages", "trigger_mode", "x_pixels_in_detector"} <= names


def test_settings_are_checked_as_a_whole_and_reported(component):
    detector, _dcu, listener = component
    with pytest.raises(SettingRefused, match="write adf_outer_radius first"):
        detector.change_settings(adf_inner_radius=13.0)  # the default outer radius is 12
    with pytest.raises(SettingRefused, match="outside the frame"):
        detector.change_settings(beam_center=[40.0, 3.0])  # the fake's frames are 16 x 16
    with pytest.raises(SettingRefused, match="diagonal"):
        detector.change_settings(bf_radius=1e308)
    with pytest.raises(SettingRefused, match="per core"):
        detector.change_settings(workers=100000)
    with pytest.raises(ValueError, match="unknown analysis"):
        detector.change_settings(analyses=["sum", "no_such_thing"])
    assert detector.settings == LiveSettings(tuning=PipelineSettings(workers=1))  # nothing refused was taken
    settings = detector.change_settings(adf_outer_radius=20.0, adf_inner_radius=13.0, nav_shape=[3, 4])
    assert settings.radii == (4.0, 13.0, 20.0) and settings.nav_shape == (3, 4)
    assert listener.settings[-1] == settings
    assert detector.change_settings(nav_shape=[]).nav_shape is None
    with pytest.raises(SettingRefused, match="config_reuse must be 0"):
        detector.change_settings(config_reuse=-1)
    assert detector.change_settings(config_reuse=2.5).config_reuse == 2.5 == detector.acquisition.config_reuse
    assert detector.change_settings(config_reuse=0).config_reuse == 0 == detector.acquisition.config_reuse


def test_a_whole_acquisition_through_the_component(component):
    detector, dcu, listener = component
    detector.change_settings(nav_shape=[2, 5], analyses=["sum"])
    wait_until(lambda: listener.state == DeviceState.ON, 30, "State ON")
    seen: list[DeviceState] = []
    detector.start_acquisition()
    seen.append(detector.condition.state)
    with pytest.raises(CommandRefused, match="Start refused in State RUNNING"):
        detector.start_acquisition()
    wait_until(lambda: listener.finals and detector.condition.state == DeviceState.ON, 60, "the acquisition done")
    assert seen == [DeviceState.RUNNING]
    final = listener.finals[-1]
    frames = dcu.frames_of(final.snapshot.series).astype(np.float64)
    np.testing.assert_array_equal(final.snapshot.buffers["sum_image"], frames.sum(axis=0))
    assert "done: 10 of 10 frames" in detector.condition.status


def test_a_dcu_that_needs_initialize_is_off_until_then(component):
    detector, dcu, listener = component
    dcu.dcu_state = "na"
    wait_until(lambda: listener.state == DeviceState.OFF, 30, "State OFF")
    assert "run Initialize" in listener.conditions[-1].status
    detector.initialize()
    wait_until(lambda: listener.state == DeviceState.ON, 30, "State ON after Initialize")
    assert "initialize" in dcu.commands
