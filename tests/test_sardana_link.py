"""The link the Sardana controllers share to one DectrisLive device, with a stand-in proxy: one
Start per acquisition for every controller of a measurement group, settings written only where
they differ, the outcome read from the device; and the scan's triggers per synchronisation."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from tango_dectris_live.processing.limits import SettingRefused, check_images_per_trigger
from tango_dectris_live.processing.series_control import scan_triggers
from tango_dectris_live.sardana.link import (HARDWARE_START, HARDWARE_TRIGGER, DeviceLink, LinkError, Plan)

TRIGGER_MODES = ["ints", "inte", "exts", "exte"]


class FakeDevice:
    """What the link reads and writes of a DectrisLive device; Start ends the acquisition at once
    (``outcome`` decides how)."""

    def __init__(self) -> None:
        self.values = {"series_id": 4, "acquisitions_ended": 10, "acquisition_status": "idle", "frames_missing": 0,
                       "last_saved_file": "", "trigger_mode": 0, "images_per_trigger": 0, "nav_shape": [1, 1],
                       "count_time": 0.01, "frame_time": 0.01, "analyses": ["sum", "sumsig"], "saving_mode": "off",
                       "saving_directory": "", "saving_name_pattern": "{series_id}.h5",
                       "result_attributes": ["sum: sum_image", "sumsig: sumsig_image", "com: com_x_image, com_y_image"],
                       "sumsig_image": [[5.0]]}
        self.writes: list[tuple[str, object]] = []
        self.starts = 0
        self.outcome = "done"

    def read_attributes(self, names):
        special = {"State": lambda: self.state(), "Status": lambda: self.status()}
        return [SimpleNamespace(value=special[name]() if name in special else self.values[name], has_failed=False)
                for name in names]

    def status(self):
        return "idle"

    def write_attribute(self, name, value):
        self.writes.append((name, value))
        self.values[name] = value

    def get_attribute_config(self, name):
        return SimpleNamespace(enum_labels=TRIGGER_MODES)

    def state(self):
        import tango
        return tango.DevState.ON

    def Start(self):
        self.starts += 1
        if self.outcome != "no series":
            self.values["series_id"] += 1
        self.values["acquisitions_ended"] += 1
        series = self.values["series_id"]
        self.values["acquisition_status"] = {"done": f"series {series} done: 1 of 1 frames processed",
                                             "failed": f"series {series} failed: error: boom",
                                             "no series": "no data: no header"}[self.outcome]

    def __getattr__(self, name):
        try:
            return self.__dict__["values"][name]
        except KeyError:
            raise AttributeError(name) from None


@pytest.fixture
def device():
    return FakeDevice()


@pytest.fixture
def link(device):
    return DeviceLink("test/dectris/1", proxy_factory=lambda name: device)


def test_controllers_of_one_group_share_one_start_and_a_lone_one_never_joins_an_old_one(link, device):
    plan = Plan(0.01)
    image_mark, counters_mark = link.load(), link.load()  # both controllers loaded, then both start
    first = link.start(image_mark, plan)
    assert link.start(counters_mark, plan) is first and device.starts == 1
    later = link.start(link.load(), plan)  # the next point: a new acquisition
    assert later is not first and device.starts == 2


def test_only_settings_that_differ_are_written(link, device):
    link.require("counters", {"com"})
    link.start(link.load(), Plan(0.02, repetitions=3))
    assert dict(device.writes) == {"analyses": ["sum", "sumsig", "com"], "nav_shape": [1, 3], "count_time": 0.02}
    device.writes.clear()
    link.start(link.load(), Plan(0.02, repetitions=3))
    assert device.writes == []


def test_hardware_trigger_takes_one_external_trigger_per_point(link, device):
    link.start(link.load(), Plan(0.1, repetitions=10, latency=0.01, synchronization=HARDWARE_TRIGGER))
    written = dict(device.writes)
    assert written["trigger_mode"] == TRIGGER_MODES.index("exts") and written["images_per_trigger"] == 1
    assert written["nav_shape"] == [1, 10] and "frame_time" not in written
    device.writes.clear()
    link.start(link.load(), Plan(0.1, repetitions=10, latency=0.01, synchronization=HARDWARE_START))
    assert dict(device.writes) == {"images_per_trigger": 0, "frame_time": pytest.approx(0.11)}


@pytest.mark.parametrize("outcome, problem", [("done", None), ("failed", "series 5 failed"),
                                              ("no series", "no series was acquired")])
def test_the_outcome_is_read_from_the_device(link, device, outcome, problem):
    device.outcome = outcome
    acquisition = link.start(link.load(), Plan(0.01))
    assert link.ended(acquisition)
    if problem is None:
        assert acquisition.problem is None and link.results(acquisition, ["sumsig_image"])["sumsig_image"][0, 0] == 5
    else:
        assert problem in acquisition.problem
        with pytest.raises(LinkError, match=problem):
            link.results(acquisition, ["sumsig_image"])


def test_results_list_their_analyses_and_saving_is_only_raised(link, device):
    assert link.result_analyses()["com_y_image"] == "com"
    device.values["saving_mode"] = "results_and_frames"
    link.want_saving("image", "results", "scans/point_{counter}.h5")
    link.start(link.load(), Plan(0.01))
    assert dict(device.writes) == {"saving_directory": "scans", "saving_name_pattern": "point_{counter}.h5"}
    with pytest.raises(LinkError, match="saving mode"):
        link.want_saving("image", "everything")


def test_a_monitor_count_is_refused(link):
    with pytest.raises(LinkError, match="monitor"):
        link.start(link.load(), Plan(-100.0))


@pytest.mark.parametrize("mode, images, expected", [
    ("ints", 0, (12, 1)), ("exts", 0, (12, 1)), ("exts", 1, (1, 12)), ("ints", 4, (4, 3)),
    ("inte", 0, (1, 12)), ("exte", 1, (1, 12))])
def test_scan_triggers(mode, images, expected):
    assert scan_triggers((3, 4), mode, images) == expected


@pytest.mark.parametrize("images, nav_shape, mode, message", [
    (5, (3, 4), "exts", "does not divide"), (2, (3, 4), "exte", "one image"), (-1, None, None, "0 .automatic.")])
def test_images_per_trigger_is_checked(images, nav_shape, mode, message):
    with pytest.raises(SettingRefused, match=message):
        check_images_per_trigger(images, nav_shape, mode)


def test_a_device_in_fault_refuses_the_scan_with_its_status(link, device):
    import tango
    device.state = lambda: tango.DevState.FAULT
    device.status = lambda: "the DCU at 10.0.0.5 does not answer"
    with pytest.raises(LinkError, match="FAULT: the DCU at 10.0.0.5 does not answer"):
        link.start(link.load(), Plan(0.01))
    assert device.starts == 0


def test_saving_raised_for_a_scan_is_lowered_back_unless_a_client_chose_it(link, device):
    link.want_saving("image", "results_and_frames")
    link.start(link.load(), Plan(0.01))
    assert device.values["saving_mode"] == "results_and_frames"
    link.want_saving("image", "results")
    link.start(link.load(), Plan(0.01))
    assert device.values["saving_mode"] == "results"
    link.want_saving("image", "off")
    link.start(link.load(), Plan(0.01))
    assert device.values["saving_mode"] == "off"  # what it was before the link raised it
    link.want_saving("image", "results")
    link.start(link.load(), Plan(0.01))
    device.values["saving_mode"] = "results_and_frames"  # a user's own choice
    link.want_saving("image", "off")
    link.start(link.load(), Plan(0.01))
    assert device.values["saving_mode"] == "results_and_frames"


def test_a_saving_want_counts_for_the_next_acquisition_only(link, device):
    link.want_saving("image", "results_and_frames")
    link.start(link.load(), Plan(0.01))
    assert device.values["saving_mode"] == "results_and_frames"
    link.start(link.load(), Plan(0.01))  # the image controller is not in this group: nobody asks
    assert device.values["saving_mode"] == "off"
