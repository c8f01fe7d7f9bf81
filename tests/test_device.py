"""The DectrisLive device against the simulator, in its own process (DeviceTestContext)."""
from __future__ import annotations

import pytest
import tango
from tango import DevState
from tango.test_context import DeviceTestContext

from tango_dectris_live.device.dectris_live import DectrisLive
from tango_dectris_live.testing import EventRecorder, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
def device(simulator):
    properties = {"DcuHost": "127.0.0.1", "DcuPort": simulator.port, "StatePollPeriod": 0.1}
    with DeviceTestContext(DectrisLive, properties=properties, process=True, timeout=30) as proxy:
        yield proxy


def wait_state(proxy, state, timeout=20.0):
    return wait_for(lambda: proxy.state() == state, timeout, f"State {state} (Status: {proxy.status()})")


def initialized(proxy):
    proxy.Initialize()
    wait_state(proxy, DevState.ON)
    # No receiver in these tests: with the stream off the simulator sends nothing, like a DCU.
    labels = list(proxy.get_attribute_config("stream_mode").enum_labels)
    proxy.stream_mode = labels.index("disabled")
    assert labels[proxy.stream_mode] == "disabled"
    return proxy


def test_starts_off_until_initialized(device):
    assert device.state() == DevState.OFF
    assert "Initialize" in device.status()
    initialized(device)
    assert "idle" in device.status()


def test_core_attributes_carry_dcu_metadata(device):
    initialized(device)
    names = {n.lower() for n in device.get_attribute_list()}
    for name in ("count_time", "frame_time", "nimages", "ntrigger", "trigger_mode", "photon_energy",
                 "compression", "roi_mode", "bit_depth_image", "x_pixels_in_detector",
                 "y_pixels_in_detector", "description", "detector_state", "temperature", "humidity",
                 "stream_mode", "stream_format", "stream_header_detail", "filewriter_mode",
                 "filewriter_name_pattern", "filewriter_nimages_per_file", "monitor_mode",
                 "threshold_1_energy"):
        assert name in names, f"{name} missing"
    count_time = device.get_attribute_config("count_time")
    assert count_time.unit == "s"
    assert "range" in count_time.description and "3600" in count_time.description
    assert count_time.writable == tango.AttrWriteType.READ_WRITE
    trigger_mode = device.get_attribute_config("trigger_mode")
    assert set(trigger_mode.enum_labels) >= {"ints", "inte", "exts", "exte"}
    assert device.get_attribute_config("x_pixels_in_detector").writable == tango.AttrWriteType.READ
    assert device.x_pixels_in_detector == 512 and device.y_pixels_in_detector == 512
    assert "QUADRO" in device.read_attribute("description").value
    assert device.detector_state == "idle"


def test_writes_go_to_the_dcu_and_limits_are_enforced(device, simulator):
    initialized(device)
    device.nimages = 7
    assert device.nimages == 7
    labels = list(device.get_attribute_config("trigger_mode").enum_labels)
    device.trigger_mode = labels.index("exts")
    assert labels[device.trigger_mode] == "exts"
    maximum = simulator.detector.get_config("detector", "count_time")["max"]
    with pytest.raises(tango.DevFailed) as failure:
        device.count_time = maximum * 10
    message = " ".join(error.desc for error in failure.value.args)
    assert "maximum" in message and f"{maximum:g}" in message, message
    assert failure.value.args[0].reason == "OutOfRangeError"
    assert device.count_time < maximum * 10


def test_side_effects_of_a_write_are_pushed_as_events(device):
    initialized(device)
    device.count_time = 0.001
    device.frame_time = 0.001
    with EventRecorder(device, changes=("frame_time",)) as log:
        device.count_time = 0.5  # longer than frame_time: the DCU lengthens frame_time
        frame_time = device.frame_time
        assert frame_time >= 0.5
        wait_for(lambda: any(v is not None and abs(v - frame_time) < 1e-12 for v in log.values("frame_time")),
                 what="a frame_time change event with the DCU's new value")


def test_live_settings_push_change_events(device):
    """A GUI follows the live settings by events, with no polling (Taurus polls what has none)."""
    initialized(device)
    device.config_reuse = 0.0
    device.nav_shape = [3, 4]
    with EventRecorder(device, changes=("nav_shape", "config_reuse", "analyses")) as log:
        device.nav_shape = [5, 6]
        device.config_reuse = 1.5
        device.analyses = ["sum", "bf"]
        wait_for(lambda: any(v is not None and list(v) == [5, 6] for v in log.values("nav_shape"))
                 and 1.5 in log.values("config_reuse")
                 and any(v is not None and list(v) == ["sum", "bf"] for v in log.values("analyses")),
                 what="change events of nav_shape, config_reuse and analyses with their new values")
    device.analyses = ["sum", "sumsig"]


def test_commands_and_state_transitions_with_events(device):
    with EventRecorder(device, changes=("State",)) as log:
        initialized(device)
        device.trigger_mode = list(device.get_attribute_config("trigger_mode").enum_labels).index("ints")
        device.count_time = 0.01
        device.frame_time = 0.01
        device.nimages = 20
        device.ntrigger = 1
        first = device.Arm()
        assert device.state() == DevState.RUNNING
        device.Trigger()
        wait_state(device, DevState.ON)  # the detector disarms itself after the series
        second = device.Arm()
        assert second == first + 1
        assert device.Disarm() == second
        wait_state(device, DevState.ON)
        states = wait_for(lambda: (s := log.values("State")) and DevState.RUNNING in s and s[-1] == DevState.ON and s,
                          what="State events up to ON after the series")
        assert states[0] in (DevState.OFF, DevState.UNKNOWN)
        assert DevState.ON in states and DevState.RUNNING in states


def test_cancel_and_abort_return_the_series(device):
    initialized(device)
    device.count_time = 0.05
    device.frame_time = 0.05
    device.nimages = 1000
    series = device.Arm()
    device.Trigger()
    wait_for(lambda: device.detector_state == "acquire", what="the DCU acquiring")
    assert device.Cancel() == series
    wait_state(device, DevState.ON)
    series = device.Arm()
    assert device.Abort() == series
    wait_state(device, DevState.ON)


def test_bad_commands_are_refused_with_the_dcu_message(device):
    initialized(device)
    with pytest.raises(tango.DevFailed):
        device.Trigger()  # not armed: Tango refuses (state ON)
    device.trigger_mode = list(device.get_attribute_config("trigger_mode").enum_labels).index("exts")
    device.count_time = 0.05
    device.frame_time = 0.05
    device.nimages = 1000  # 50 s of external triggers: still running below
    device.Arm()
    with pytest.raises(tango.DevFailed) as failure:
        device.Arm()  # already armed
    assert "Arm refused in State RUNNING" in failure.value.args[0].desc
    device.Disarm()
    wait_state(device, DevState.ON)


def test_unreachable_dcu_then_reconnection(simulator):
    from sim.server import SimulatorServer

    port = simulator.port
    properties = {"DcuHost": "127.0.0.1", "DcuPort": port, "StatePollPeriod": 0.1}
    with DeviceTestContext(DectrisLive, properties=properties, process=True, timeout=30) as proxy:
        initialized(proxy)
        simulator.stop()
        wait_state(proxy, DevState.UNKNOWN)
        assert "unreachable" in proxy.status() and str(port) in proxy.status()
        with pytest.raises(tango.DevFailed):
            proxy.Arm()
        restarted = SimulatorServer(host="127.0.0.1", port=port, model="QUADRO")
        restarted.start()
        try:
            wait_state(proxy, DevState.OFF)  # a fresh DCU needs Initialize again
            initialized(proxy)
            proxy.nimages = 3
            assert proxy.nimages == 3
        finally:
            restarted.stop()


def test_missing_dcu_host_is_a_clear_fault():
    with DeviceTestContext(DectrisLive, properties={}, process=True, timeout=30) as proxy:
        assert proxy.state() == DevState.FAULT
        assert "DcuHost" in proxy.status()


def test_unknown_stream_transport_is_a_clear_fault(simulator):
    properties = {"DcuHost": "127.0.0.1", "DcuPort": simulator.port, "StreamTransport": "udp"}
    with DeviceTestContext(DectrisLive, properties=properties, process=True, timeout=30) as proxy:
        assert proxy.state() == DevState.FAULT
        assert "StreamTransport" in proxy.status() and "'udp'" in proxy.status()
        assert "auto, zmtp, libzmq" in proxy.status()


def test_a_refused_command_is_reported_and_the_acquisition_goes_on(device):
    initialized(device)
    device.trigger_mode = list(device.get_attribute_config("trigger_mode").enum_labels).index("exts")
    device.count_time = 0.05
    device.frame_time = 0.05
    device.nimages = 1000
    device.Arm()
    device.Trigger()  # exts: the DCU refuses software triggers
    wait_for(lambda: "trigger failed" in device.status(), what="the refusal in Status (Status: %r)" % device.status())
    assert "exts" in device.status()
    assert device.state() == DevState.RUNNING  # the externally triggered series goes on
    device.Disarm()  # an accepted command clears the report
    wait_state(device, DevState.ON)
