"""SeriesSaving: the settings a device exposes, checked when set; the writer started when saving is
switched on (not on the first series' path)."""
from __future__ import annotations

import pytest

from tango_dectris_live.processing.series_saving import SavingSettings, SeriesSaving
from tango_dectris_live.saving import SavingError, SavingUnavailable
from tango_dectris_live.testing import wait_for


def test_without_a_base_directory_only_off_is_taken():
    saving = SeriesSaving("")
    assert "no SavingBaseDirectory" in saving.status_text(saving.status())
    with pytest.raises(SavingUnavailable, match="SavingBaseDirectory is empty"):
        saving.settings = SavingSettings(mode="results")
    with pytest.raises(SavingError, match="saving_mode must be one of off, results, results_and_frames"):
        saving.settings = SavingSettings(mode="all")
    assert saving.settings.mode == "off"


def test_switching_saving_on_starts_the_writer_in_the_background(tmp_path):
    saving = SeriesSaving(str(tmp_path))
    try:
        assert saving.status() is None  # no writer while off
        saving.settings = SavingSettings(mode="results", directory="a", name_pattern="s_{series_id}.h5")
        wait_for(lambda: saving.status() is not None, 60, "the writer process started")
    finally:
        saving.close()
    assert saving.status() is None
