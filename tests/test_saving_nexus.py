"""One series file: frames byte for byte as received, read back by h5py+hdf5plugin and LiberTEM;
missing frames, results, detector settings, layout."""
from __future__ import annotations

import dataclasses
import struct
from pathlib import Path

import bitshuffle
import dectris.compression
import h5py
import hdf5plugin  # noqa: F401 - registers the HDF5 filters for reading back
import numpy as np
import pytest

from tango_dectris_live.saving import NexusSeriesWriter, PartLayout, SeriesFileError, SeriesFileSpec, stored_frames
from tango_dectris_live.saving.testing import BlobStacks
from tango_dectris_live.testing.stream_producer import compress, random_frames

TESTDATA = Path(__file__).resolve().parents[2] / "shared" / "testdata"
SHAPE = (24, 40)

# (stream encoding as the producer names it, stream version, frame-stack encoding)
ENCODINGS = [("bslz4", 1, "bs16-lz4<"), ("bslz4", 2, "bslz4"), ("lz4", 1, "lz4"), ("lz4", 2, "lz4h5"),
             ("none", 1, "none")]


def spec(encoding: str, n_frames: int | None = 10, dtype: str = "uint16", **kwargs) -> SeriesFileSpec:
    return SeriesFileSpec(series_id=7, frame_shape=SHAPE, dtype=dtype, encoding=encoding, n_frames=n_frames, **kwargs)


def read(path: Path, name: str = "/entry/data/data") -> np.ndarray:
    with h5py.File(path, "r") as f:
        return f[name][()]


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "uint32"])
@pytest.mark.parametrize("stream_encoding, version, encoding", ENCODINGS)
def test_frames_read_back_exactly(tmp_path, stream_encoding, version, encoding, dtype):
    frames = random_frames(10, SHAPE, dtype, seed=version)
    path = tmp_path / "s.h5"
    with NexusSeriesWriter(path, spec(encoding, dtype=dtype)) as writer:
        for i, frame in enumerate(frames):
            assert writer.write_frame(i, compress(frame, stream_encoding, version))
    saved = writer.close()
    assert saved.complete and saved.frames_saved == 10 and saved.frames_missing == 0 and saved.file_closed
    data = read(path)
    assert data.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(data, frames)
    assert read(path, "/entry/data/missing_frames").size == 0


def test_chunks_are_the_received_blobs(tmp_path):
    """Direct chunk write: the bytes in the file are the stream's (v2 lz4: the HDF5 framing as
    sent; v1 lz4<: the 16-byte framing + the block)."""
    frame = random_frames(1, SHAPE)[0]
    for stream_encoding, version, encoding in ENCODINGS:
        blob = compress(frame, stream_encoding, version)
        path = tmp_path / f"{encoding}.h5"
        with NexusSeriesWriter(path, spec(encoding, n_frames=1)) as writer:
            writer.write_frame(0, blob)
        with h5py.File(path, "r") as f:
            mask, chunk = f["/entry/data/data"].id.read_direct_chunk((0, 0, 0))
        expected = struct.pack(">QII", frame.nbytes, frame.nbytes, len(blob)) + blob if encoding == "lz4" else blob
        assert mask == 0 and chunk == expected, encoding


def test_bitshuffle_zstd_frames(tmp_path):
    frames = random_frames(3, SHAPE)
    blobs = [struct.pack(">QI", f.nbytes, 8192) + bitshuffle.compress_zstd(f).tobytes() for f in frames]
    assert np.frombuffer(dectris.compression.decompress(blobs[0], "bszstd", elem_size=2), "<u2").size == frames[0].size
    with NexusSeriesWriter(tmp_path / "z.h5", spec("bszstd", n_frames=3)) as writer:
        for i, blob in enumerate(blobs):
            writer.write_frame(i, blob)
    np.testing.assert_array_equal(read(tmp_path / "z.h5"), frames)


@pytest.mark.parametrize("stream_encoding, version, encoding", ENCODINGS)
def test_stacks_from_shared_memory_with_missing_frames(tmp_path, stream_encoding, version, encoding):
    frames = random_frames(20, SHAPE, seed=3)
    received = [i for i in range(20) if i not in (3, 4, 17)]
    order = received[::-1]  # stacks hold frames in arrival order, not sorted
    path = tmp_path / "s.h5"
    with BlobStacks(2, 10, 2048) as stacks, NexusSeriesWriter(path, spec(encoding, n_frames=20)) as writer:
        for part in (order[:10], order[10:]):
            handle = stacks.stack([compress(frames[i], stream_encoding, version) for i in part], part,
                                  shape=SHAPE, dtype="uint16", encoding=encoding)
            assert writer.write_stack(handle) == len(part)
            stacks.release(handle)
        saved = writer.close("timeout")
    assert saved.frames_saved == 17 and saved.frames_missing == 3 and not saved.complete
    expected = frames.copy()
    expected[[3, 4, 17]] = 0  # never written: the fill value
    np.testing.assert_array_equal(read(path), expected)
    np.testing.assert_array_equal(read(path, "/entry/data/missing_frames"), [3, 4, 17])
    assert read(path, "/entry/data/missing_frames").dtype == np.int64
    with h5py.File(path, "r") as f:
        assert f["/entry/saving_status"][()].decode().startswith("incomplete: 17 frames saved, 3 missing")
        assert "series ended: timeout" in f["/entry/saving_status"][()].decode()
        np.testing.assert_array_equal(stored_frames(f["/entry/data/data"]), np.isin(np.arange(20), received))


def _dcu_blobs() -> tuple[list[bytes], tuple[int, int], list[bytes]]:
    if not (TESTDATA / "stream_v1_eiger4m").is_dir():
        pytest.skip(f"real detector captures not found at {TESTDATA}")
    v1 = [(TESTDATA / "stream_v1_eiger4m" / f"part_{n:02d}").read_bytes() for n in (12, 16, 20)]
    v2 = [(TESTDATA / "stream_v2_eiger2_16m" / "frame_bslz4_uint16_4148x4362.bin").read_bytes()]
    return v1, (2167, 2070), v2


def test_real_dcu_blobs_read_back_as_dectris_compression_decodes_them(tmp_path):
    v1, shape, v2 = _dcu_blobs()
    for blobs, frame_shape, encoding in ((v1, shape, "bs16-lz4<"), (v2, (4362, 4148), "bslz4")):
        path = tmp_path / f"{encoding.replace('<', '')}.h5"
        file_spec = SeriesFileSpec(series_id=6, frame_shape=frame_shape, dtype="uint16", encoding=encoding,
                                   n_frames=len(blobs))
        with NexusSeriesWriter(path, file_spec) as writer:
            for i, blob in enumerate(blobs):
                assert writer.write_frame(i, blob)
        with h5py.File(path, "r") as f:
            for i, blob in enumerate(blobs):
                expected = np.frombuffer(dectris.compression.decompress(blob, "bslz4", elem_size=2), "<u2")
                np.testing.assert_array_equal(f["/entry/data/data"][i], expected.reshape(frame_shape))


@pytest.mark.parametrize("parts", [1, 2], ids=["one file", "two part files"])
def test_libertem_reads_the_file_and_reproduces_sum_and_sumsig(tmp_path, parts):
    """With two part files LiberTEM reads the series file's virtual dataset, as with one file."""
    from tests.libertem_reading import libertem_sums  # LiberTEM loads slowly: only where it is needed

    frames = random_frames(24, SHAPE, seed=11)
    path = tmp_path / "lt.h5"
    series_spec = spec("bslz4", n_frames=24, scan_shape=(4, 6))
    with BlobStacks(3, 8, 2048) as stacks:
        handles = [stacks.stack([compress(f, "bslz4") for f in frames[first:first + 8]],
                                list(range(first, first + 8)), shape=SHAPE, dtype="uint16", encoding="bslz4")
                   for first in range(0, 24, 8)]
        if parts == 1:
            with NexusSeriesWriter(path, series_spec) as writer:
                for handle in handles:
                    writer.write_stack(handle)
        else:
            layout = PartLayout("lt.h5", ("lt_part0.h5", "lt_part1.h5"), block=8)
            series_spec = dataclasses.replace(series_spec, parts=layout)
            with NexusSeriesWriter(path, series_spec) as writer:
                part_writers = [NexusSeriesWriter(tmp_path / name, series_spec, part=k)
                                for k, name in enumerate(layout.files)]
                for handle in handles:  # each part writer takes its own frames of every stack
                    assert sum(part.write_stack(handle) for part in part_writers) == 8
                writer.close("complete", [part.close_part() for part in part_writers])
            with h5py.File(path, "r") as f:
                assert f["/entry/data/data"].is_virtual
    total, per_frame = libertem_sums(path)
    np.testing.assert_array_equal(total, frames.sum(axis=0, dtype=np.float64))
    np.testing.assert_array_equal(per_frame.ravel(), frames.sum(axis=(1, 2), dtype=np.float64))


def test_frames_that_cannot_be_chunks_are_refused_and_counted(tmp_path):
    frames = random_frames(4, SHAPE)
    other = random_frames(1, (SHAPE[0], SHAPE[1] + 8))[0]
    with NexusSeriesWriter(tmp_path / "s.h5", spec("bslz4", n_frames=4)) as writer:
        assert writer.write_frame(0, compress(frames[0], "bslz4"))
        assert not writer.write_frame(1, compress(other, "bslz4"))  # another geometry
        assert not writer.write_frame(2, b"\0\0\0")  # shorter than its header
        assert not writer.write_frame(9, compress(frames[3], "bslz4"))  # outside the series
        assert not writer.write_frame(3, compress(frames[3], "none"), encoding="none")  # another encoding
    saved = writer.close()
    assert saved.frames_saved == 1 and saved.frames_refused == 4
    assert any("header declares" in note for note in saved.notes)
    assert any("outside the series' 4 frames" in note for note in saved.notes)
    np.testing.assert_array_equal(read(tmp_path / "s.h5", "/entry/data/missing_frames"), [1, 2, 3])


def test_unknown_length_grows_with_the_frames(tmp_path):
    frames = random_frames(12, SHAPE)
    with NexusSeriesWriter(tmp_path / "s.h5", spec("bslz4", n_frames=None)) as writer:
        for i in (0, 1, 5, 11):
            writer.write_frame(i, compress(frames[i], "bslz4"))
        assert not writer.write_frame(1 << 40, compress(frames[0], "bslz4"))  # a corrupt frame number
    saved = writer.close()
    data = read(tmp_path / "s.h5")
    assert data.shape == (12, *SHAPE) and saved.frames_saved == 4 and saved.frames_missing == 8
    assert saved.frames_refused == 1 and "outside the series' 12 frames" in saved.notes[0]
    np.testing.assert_array_equal(data[[0, 1, 5, 11]], frames[[0, 1, 5, 11]])
    np.testing.assert_array_equal(read(tmp_path / "s.h5", "/entry/data/missing_frames"), [2, 3, 4, 6, 7, 8, 9, 10])


def test_multi_channel_frames_keep_every_configured_channel(tmp_path):
    low, high = random_frames(3, SHAPE, seed=1), random_frames(3, SHAPE, seed=2)
    with NexusSeriesWriter(tmp_path / "s.h5", spec("bslz4", n_frames=3, channels=("threshold_1", "threshold_2"))) as w:
        for i in range(3):
            w.write_frame(i, compress(low[i], "bslz4"), channel=0)
            w.write_frame(i, compress(high[i], "bslz4"), channel=1)
    np.testing.assert_array_equal(read(tmp_path / "s.h5"), low)
    np.testing.assert_array_equal(read(tmp_path / "s.h5", "/entry/data/data_threshold_2"), high)


LAYOUT = {"sum": {"intensity": ((24, 40), "float64")},
          "sumsig": {"sumsig": ((2, 3), "float32"), "total": ((), "float64")}}
PARAMETERS = {"sum": {"radius": 3.5, "centre": (12, 20), "name": "sum of frames", "nothing": None},
              "sumsig": {}}


def test_results_are_written_in_place_and_keep_nan(tmp_path):
    path = tmp_path / "r.h5"
    sumsig = np.arange(6, dtype=np.float32).reshape(2, 3)
    sumsig[1, 2] = np.nan  # a frame that never came: the caller blanks it
    with NexusSeriesWriter(path, spec("bslz4", n_frames=6, scan_shape=(2, 3), result_layout=LAYOUT,
                                      analysis_parameters=PARAMETERS)) as writer:
        writer.write_results({"sumsig": np.zeros((2, 3), np.float32)})  # a refresh while running
        done = np.ones((2, 3), bool)
        done[1, 2] = False
        writer.write_results({"sumsig": sumsig, "intensity": np.ones(SHAPE), "total": np.float64(15.0)}, done)
    with h5py.File(path, "r") as f:
        group = f["/entry/results/sumsig"]
        np.testing.assert_array_equal(group["sumsig"][()], sumsig)  # NaN compares equal here
        assert np.isnan(group["sumsig"][1, 2])
        assert group["total"][()] == 15.0
        np.testing.assert_array_equal(f["/entry/results/frames_done"][()], done.astype(np.uint8))
        assert group.attrs["NX_class"] == "NXprocess"
        plot = group["sumsig_plot"]
        assert plot.attrs["NX_class"] == "NXdata" and plot.attrs["signal"] == "sumsig"
        assert plot["sumsig"] == group["sumsig"]  # the same dataset (hard link)
        attrs = f["/entry/results/sum"].attrs
        assert attrs["radius"] == 3.5 and list(attrs["centre"]) == [12, 20] and attrs["name"] == "sum of frames"
        assert attrs["nothing"] == "None"


def test_unwritten_float_results_read_as_nan(tmp_path):
    with NexusSeriesWriter(tmp_path / "r.h5", spec("bslz4", result_layout=LAYOUT)):
        pass
    assert np.isnan(read(tmp_path / "r.h5", "/entry/results/sumsig/sumsig")).all()


def test_results_outside_the_layout_are_refused(tmp_path):
    with NexusSeriesWriter(tmp_path / "r.h5", spec("bslz4", result_layout=LAYOUT)) as writer:
        with pytest.raises(SeriesFileError, match=r"not in the series file's layout"):
            writer.write_results({"com": np.zeros(3)})
        with pytest.raises(SeriesFileError, match=r"shape \(3, 2\), the file's layout \(2, 3\)"):
            writer.write_results({"sumsig": np.zeros((3, 2))})


def test_duplicate_result_names_are_refused(tmp_path):
    layout = {"a": {"image": ((2,), "f8")}, "b": {"image": ((2,), "f8")}}
    with pytest.raises(SeriesFileError, match="two analyses"):
        NexusSeriesWriter(tmp_path / "r.h5", spec("bslz4", result_layout=layout))


def test_layout_and_detector_settings(tmp_path):
    config = {"count_time": (0.001, "s"), "x_pixel_size": (7.5e-05, "m"), "beam_center_x": (256.5, "pixel"),
              "bit_depth_image": (16, None), "threshold_energy": (4020.5, "eV"), "sensor_material": ("Si", None),
              "sensor_thickness": (0.00045, "m"), "description": ("Dectris QUADRO Si 250K", None),
              "detector_number": ("Q-01-0001", None), "threshold/1/energy": (4020.5, "eV"),
              "flatfield_correction_applied": (True, None), "roi_y_size": ([256, 512], None),
              "odd": ({"nested": 1}, None), "unknown": (None, None), "pixel_mask": (np.zeros((2, 2), np.uint32), None)}
    path = tmp_path / "l.h5"
    with NexusSeriesWriter(path, spec("bslz4", n_frames=4, scan_shape=(2, 2), title="my scan",
                                      detector_config=config)):
        pass
    with h5py.File(path, "r") as f:
        entry = f["/entry"]
        assert f.attrs["default"] == "entry" and entry.attrs["NX_class"] == "NXentry"
        assert entry["title"][()] == b"my scan" and entry["series_id"][()] == 7
        np.testing.assert_array_equal(entry["scan_shape"][()], [2, 2])
        assert entry["start_time"][()].decode()[:2] == "20" and "T" in entry["end_time"][()].decode()
        assert f["/entry/instrument"].attrs["NX_class"] == "NXinstrument"
        detector = f["/entry/instrument/detector"]
        assert detector.attrs["NX_class"] == "NXdetector"
        assert detector["count_time"][()] == 0.001 and detector["count_time"].attrs["units"] == "s"
        assert detector["x_pixel_size"].attrs["units"] == "m" and detector["bit_depth_image"][()] == 16
        assert "units" not in detector["bit_depth_image"].attrs
        assert detector["sensor_material"][()] == b"Si"
        assert detector["description"][()] == b"Dectris QUADRO Si 250K"
        assert detector["threshold_1_energy"].attrs["simplon_key"] == "threshold/1/energy"
        assert bool(detector["flatfield_correction_applied"][()]) is True
        np.testing.assert_array_equal(detector["roi_y_size"][()], [256, 512])
        assert detector["odd"][()] == b'{"nested": 1}'
        assert list(detector.attrs["unavailable_keys"]) == ["unknown"]
        assert detector["pixel_mask"].shape == (2, 2)
        assert detector["data"] == f["/entry/data/data"]  # the NXdetector's data is the raw frames
        data = f["/entry/data"]
        assert data.attrs["NX_class"] == "NXdata" and data.attrs["signal"] == "data"
        frames = data["data"]
        assert frames.shape == (4, *SHAPE) and frames.chunks == (1, *SHAPE)
        assert frames.id.get_create_plist().get_filter(0)[0] == 32008
    assert path.read_bytes()[8] == 3  # superblock version 3: HDF5 1.10's format, SWMR-capable


@pytest.mark.parametrize("encoding, filter_id", [("bslz4", 32008), ("lz4", 32004), ("lz4h5", 32004), ("none", None)])
def test_dataset_filters(tmp_path, encoding, filter_id):
    with NexusSeriesWriter(tmp_path / "f.h5", spec(encoding, n_frames=1)):
        pass
    with h5py.File(tmp_path / "f.h5", "r") as f:
        plist = f["/entry/data/data"].id.get_create_plist()
        assert (plist.get_filter(0)[0] if plist.get_nfilters() else None) == filter_id


def test_unknown_encoding_is_refused_with_the_known_ones(tmp_path):
    with pytest.raises(SeriesFileError, match="cannot be saved; known encodings: .*bslz4"):
        NexusSeriesWriter(tmp_path / "x.h5", spec("jpeg"))


def test_incomplete_geometry_is_refused(tmp_path):
    with pytest.raises(SeriesFileError, match="frame shape, pixel type and encoding must be known"):
        NexusSeriesWriter(tmp_path / "x.h5", SeriesFileSpec(series_id=1))


def test_a_full_disk_stops_frames_and_closes_the_file(tmp_path, monkeypatch):
    """The space check says no (here: a file system with little room left): no more frames, the
    file closed normally with what was written, the reason in its status."""
    from tango_dectris_live.saving import nexus

    frames = random_frames(6, SHAPE)
    writer = NexusSeriesWriter(tmp_path / "full.h5", spec("bslz4", n_frames=6), check_space=True)
    for i in range(3):
        assert writer.write_frame(i, compress(frames[i], "bslz4"))
    monkeypatch.setattr(writer._space, "_fallocate", None)  # as on a file system without fallocate
    monkeypatch.setattr(nexus.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 1000})())
    assert not writer.write_frame(3, compress(frames[3], "bslz4"))
    assert writer.stopped and "disk full" in writer.stopped_reason
    assert not writer.write_frame(4, compress(frames[4], "bslz4"))
    monkeypatch.undo()
    saved = writer.close()
    assert saved.file_closed and saved.frames_saved == 3 and saved.stopped_reason.startswith("disk full")
    with h5py.File(tmp_path / "full.h5", "r") as f:
        np.testing.assert_array_equal(f["/entry/data/data"][:3], frames[:3])
        np.testing.assert_array_equal(f["/entry/data/missing_frames"][()], [3, 4, 5])
        assert f["/entry/saving_status"][()].decode().startswith("stopped: disk full")


def test_silx_sees_every_nxdata_group(tmp_path):
    nxdata = pytest.importorskip("silx.io.nxdata", reason="silx is not installed (an optional viewer)")
    path = tmp_path / "v.h5"
    with NexusSeriesWriter(path, spec("bslz4", n_frames=6, scan_shape=(2, 3), result_layout=LAYOUT,
                                      analysis_parameters=PARAMETERS)):
        pass
    with h5py.File(path, "r") as f:
        for name in ("/entry/data", "/entry/results/sum/intensity_plot", "/entry/results/sumsig/sumsig_plot"):
            assert nxdata.is_valid_nxdata(f[name]), name
        assert nxdata.get_default(f).group.name == "/entry/data"


@pytest.mark.parametrize("encoding", ["bslz4", "none"])
def test_a_stack_with_frames_that_cannot_be_chunks_saves_the_rest(tmp_path, encoding):
    """The stack path checks a whole stack at once: each bad frame refused and counted, the good
    ones of the same stack written, a frame saved twice counted once."""
    frames = random_frames(6, SHAPE, seed=5)
    other = random_frames(1, (SHAPE[0], SHAPE[1] + 8))[0]
    blobs = [compress(frames[0], encoding), compress(other, encoding), compress(frames[2], encoding),
             compress(frames[3], encoding), compress(frames[4], encoding), compress(frames[2], encoding)]
    numbers = [0, 1, 2, 9, 4, 2]  # 1: another geometry; 9: outside the series; 2 twice
    if encoding == "bslz4":
        blobs.append(b"\0\0\0")  # shorter than its header
        numbers.append(5)
    with BlobStacks(1, 10, 4096) as stacks, NexusSeriesWriter(tmp_path / "s.h5", spec(encoding, n_frames=6)) as writer:
        handle = stacks.stack(blobs, numbers, shape=SHAPE, dtype="uint16", encoding=encoding)
        assert writer.write_stack(handle) == 4  # 0, 2, 4 and 2 again
        stacks.release(handle)
        saved = writer.close()
    refused = 3 if encoding == "bslz4" else 2
    assert saved.frames_saved == 3 and saved.frames_refused == refused
    assert any("outside the series' 6 frames" in note for note in saved.notes)
    # a kind of refusal is listed with its count and its first message
    first = "shorter than its 12-byte header" if encoding == "bslz4" else "uncompressed bytes, the frame needs"
    assert any(first in note for note in saved.notes), saved.notes
    data = read(tmp_path / "s.h5")
    np.testing.assert_array_equal(data[[0, 2, 4]], frames[[0, 2, 4]])
    np.testing.assert_array_equal(read(tmp_path / "s.h5", "/entry/data/missing_frames"), [1, 3, 5])
