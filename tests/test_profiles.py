"""Hardware profiles: shipped files load, bad fields are refused naming file + field, detect round-trips."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import tomllib
from click.testing import CliRunner

from edgellm._toml import dumps_toml
from edgellm.cli import main
from edgellm.errors import ProfileError
from edgellm.hardware import detect, isa_from_cpu_flags, measure_bandwidth_gbps
from edgellm.profiles import (
    GIB,
    KNOWN_ISA,
    KNOWN_RUNTIMES,
    Profile,
    default_profiles_dir,
    get_profile,
    load_profile,
    load_profiles,
)

SHIPPED = Path(__file__).resolve().parent.parent / "hardware_profiles"


def _valid() -> dict:
    """A valid profile as the TOML structure (a copy of the shipped Raspberry Pi 5 file)."""
    return tomllib.loads((SHIPPED / "rpi5-8gb.toml").read_text())


def _write(tmp_path: Path, data: dict, stem: str | None = None) -> Path:
    stem = stem or data.get("name") or "x"
    p = tmp_path / f"{stem}.toml"
    p.write_text(dumps_toml(data))
    return p


# --------------------------------------------------------------------------- shipped profiles


def test_every_shipped_profile_loads_and_round_trips():
    profiles = load_profiles(SHIPPED)
    assert len(profiles) >= 8
    for name, prof in profiles.items():
        assert prof.path is not None and prof.path.stem == name
        assert all(s.startswith("https://") or s.startswith("http://") for s in prof.sources)
        assert prof.isa <= KNOWN_ISA and prof.runtimes <= KNOWN_RUNTIMES
        assert 0 < prof.usable_ram_bytes <= prof.ram_bytes
        # to_toml -> load gives the same profile
        assert Profile.from_dict(tomllib.loads(prof.to_toml()), path=prof.path) == prof


def test_required_device_classes_are_present():
    profiles = load_profiles(SHIPPED)
    for name in (
        "rpi4-4gb",
        "rpi5-8gb",
        "jetson-orin-nano-8gb",
        "jetson-agx-orin-64gb",
        "intel-n100-16gb",
        "x86-avx2-laptop-16gb",
        "rk3588-16gb",
        "esp32-s3-8mb",
    ):
        assert name in profiles
    mcu = profiles["esp32-s3-8mb"]
    assert mcu.device_class == "mcu" and mcu.runtimes == frozenset() and not mcu.can_run_llm
    assert mcu.ram_bytes == 8 * 1024**2
    assert profiles["rpi5-8gb"].ram_bytes == 8 * GIB
    assert "dotprod" in profiles["rpi5-8gb"].isa and "dotprod" not in profiles["rpi4-4gb"].isa
    assert "avx512_vnni" in profiles["x86-avx512-ipc-32gb"].isa
    assert {a.kind for a in profiles["jetson-agx-orin-64gb"].accelerators} == {"gpu", "npu"}


def test_default_dir_and_env_override(tmp_path, monkeypatch):
    monkeypatch.delenv("EDGELLM_PROFILES_DIR", raising=False)
    assert default_profiles_dir().resolve() == SHIPPED
    assert get_profile("rpi5-8gb").display_name == "Raspberry Pi 5 (8 GB)"
    monkeypatch.setenv("EDGELLM_PROFILES_DIR", str(tmp_path))
    assert load_profiles() == {}
    monkeypatch.setenv("EDGELLM_PROFILES_DIR", str(tmp_path / "missing"))
    with pytest.raises(ProfileError, match="EDGELLM_PROFILES_DIR"):
        default_profiles_dir()


def test_unknown_name_lists_known_names():
    with pytest.raises(ProfileError) as e:
        get_profile("rpi9", SHIPPED)
    assert "rpi9" in str(e.value) and "rpi5-8gb" in str(e.value) and "esp32-s3-8mb" in str(e.value)
    assert e.value.hint


# --------------------------------------------------------------------------- validation


def _set(data: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        data = data[p]
    if value is _DELETE:
        del data[last]
    else:
        data[last] = value


_DELETE = object()

BAD_FIELDS = [
    ("memory.ram_gb", -1, "memory.ram_gb: must be > 0, got -1"),
    ("memory.ram_gb", "8", "memory.ram_gb: must be a number"),
    ("memory.ram_gb", _DELETE, "memory.ram_gb: missing required field"),
    ("memory.model_share", 1.5, "memory.model_share: must be <= 1"),
    ("memory.model_share", 0, "memory.model_share: must be > 0"),
    ("memory.bandwidth_gbps", True, "memory.bandwidth_gbps: must be a number"),
    ("cpu.isa", ["neon", "avx9"], "cpu.isa: unknown value(s) ['avx9']"),
    ("cpu.isa", "neon", "cpu.isa: must be a list of strings"),
    ("cpu.cores", 0, "cpu.cores: must be >= 1"),
    ("cpu.cores", 4.0, "cpu.cores: must be an integer"),
    ("cpu.freq_ghz", _DELETE, "cpu.freq_ghz: missing required field"),
    ("runtimes.available", ["tensorrt"], "runtimes.available: unknown value(s) ['tensorrt']"),
    ("runtimes.threads", 64, "runtimes.threads: must be <= cpu.cores"),
    ("targets.max_first_token_ms", -5, "targets.max_first_token_ms: must be >= 1"),
    ("targets.context_length", _DELETE, "targets.context_length: missing required field"),
    ("power.budget_w", float("nan"), "power.budget_w: must be finite"),
    ("power", _DELETE, "power: missing required field"),
    ("memory", 8, "memory: must be a table"),
    ("sources", [], "sources: must not be empty"),
    ("sources", ["raspberrypi.com"], "sources[0]: must be a URL"),
    ("sources", _DELETE, "sources: missing required field"),
    ("device_class", "toaster", "device_class: must be one of"),
    ("arch", "sparc", "arch: must be one of"),
    ("schema_version", 2, "schema_version: unsupported version 2"),
    ("name", "Bad_Name", "name: must match"),
]


@pytest.mark.parametrize("field,value,expected", BAD_FIELDS, ids=[f"{f}={v!r}"[:40] for f, v, _ in BAD_FIELDS])
def test_bad_field_is_refused_naming_file_and_field(tmp_path, field, value, expected):
    data = _valid()
    _set(data, field, value)
    # nan cannot be written as TOML by our writer: write that one by hand
    if isinstance(value, float) and value != value:
        text = dumps_toml(_valid()).replace("budget_w = 12.0", "budget_w = nan")
        path = tmp_path / "rpi5-8gb.toml"
        path.write_text(text)
    else:
        path = _write(tmp_path, data, stem="rpi5-8gb")
    with pytest.raises(ProfileError) as e:
        load_profile(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: "), msg
    assert expected in msg, msg
    assert e.value.hint


def test_name_must_equal_file_stem(tmp_path):
    path = _write(tmp_path, _valid(), stem="other-name")
    with pytest.raises(ProfileError, match=r"other-name\.toml: name: must equal the file name stem"):
        load_profile(path)


@pytest.mark.parametrize("where", ["top", "memory", "accelerator"])
def test_unknown_keys_are_refused(tmp_path, where):
    data = _valid()
    if where == "top":
        data["colour"] = "red"
        expected = "<top level>: unknown field(s) ['colour']"
    elif where == "memory":
        data["memory"]["ram_gib"] = 8.0  # a typo must not pass silently
        expected = "memory: unknown field(s) ['ram_gib']"
    else:
        data["accelerators"] = [{"kind": "npu", "name": "x", "tops_int8": 1.0, "tops": 2}]
        expected = "accelerators[0]: unknown field(s) ['tops']"
    path = _write(tmp_path, data)
    with pytest.raises(ProfileError) as e:
        load_profile(path)
    assert str(e.value).startswith(f"{path}: ") and expected in str(e.value)


def test_bad_accelerator_and_bad_toml(tmp_path):
    data = _valid()
    data["accelerators"] = [{"kind": "fpga", "name": "x", "tops_int8": 1.0}]
    with pytest.raises(ProfileError, match=r"accelerators\[0\]\.kind: must be one of"):
        load_profile(_write(tmp_path, data))
    broken = tmp_path / "broken.toml"
    broken.write_text("name = [unclosed\n")
    with pytest.raises(ProfileError, match=r"broken\.toml: not valid TOML"):
        load_profile(broken)
    with pytest.raises(ProfileError, match="cannot read"):
        load_profile(tmp_path / "absent.toml")


def test_one_bad_file_fails_the_whole_directory_load(tmp_path):
    (tmp_path / "rpi5-8gb.toml").write_text((SHIPPED / "rpi5-8gb.toml").read_text())
    data = _valid()
    data["name"] = "bad"
    data["memory"]["ram_gb"] = -1
    _write(tmp_path, data)
    with pytest.raises(ProfileError, match=r"bad\.toml: memory\.ram_gb"):
        load_profiles(tmp_path)


# --------------------------------------------------------------------------- detection


def test_isa_mapping():
    assert isa_from_cpu_flags("x86_64", "fpu sse4_2 avx avx2 fma avx512f avx512_vnni avx512bw".split()) == {
        "sse4_2",
        "avx",
        "avx2",
        "fma",
        "avx512f",
        "avx512_vnni",
    }
    assert isa_from_cpu_flags("aarch64", "fp asimd asimddp i8mm sve crc32".split()) == {
        "neon",
        "dotprod",
        "i8mm",
        "sve",
    }


def test_detect_round_trips_through_load_profile(tmp_path):
    prof = detect(measure_bandwidth=False, name="this-box")
    assert prof.cores >= 1 and prof.ram_bytes > 0 and prof.threads <= prof.cores
    path = tmp_path / "this-box.toml"
    path.write_text(prof.to_toml(header="test"))
    assert load_profile(path) == prof


def test_measure_bandwidth_is_positive():
    assert measure_bandwidth_gbps(seconds=0.05, buffer_mb=16) > 0
    assert measure_bandwidth_gbps(seconds=0.05, buffer_mb=16, threads=2) > 0


# --------------------------------------------------------------------------- CLI


def test_cli_list_and_show_json(monkeypatch):
    monkeypatch.delenv("EDGELLM_PROFILES_DIR", raising=False)
    runner = CliRunner()
    r = runner.invoke(main, ["profiles", "list", "--format", "json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)
    assert len(rows) >= 8 and {"esp32-s3-8mb", "rpi5-8gb"} <= {x["name"] for x in rows}
    r = runner.invoke(main, ["profiles", "show", "rpi5-8gb", "--format", "json"])
    assert r.exit_code == 0, r.output
    shown = json.loads(r.output)
    assert shown["memory"]["ram_gb"] == 8.0 and shown["derived"]["usable_ram_bytes"] == 4 * GIB
    for args in (["profiles", "list"], ["profiles", "show", "esp32-s3-8mb"]):
        r = runner.invoke(main, args)
        assert r.exit_code == 0 and "esp32-s3-8mb" in r.output


def test_cli_show_unknown_name_fails_listing_known():
    r = CliRunner().invoke(main, ["profiles", "show", "nope", "--dir", str(SHIPPED)])
    assert r.exit_code != 0
    assert "unknown hardware profile 'nope'" in r.output and "rpi4-4gb" in r.output


def test_cli_list_bad_dir_is_a_clean_error(tmp_path):
    data = _valid()
    data["memory"]["model_share"] = 2
    _write(tmp_path, data)
    r = CliRunner().invoke(main, ["profiles", "list", "--dir", str(tmp_path)])
    assert r.exit_code != 0 and "memory.model_share: must be <= 1" in r.output
    assert "Traceback" not in r.output


def test_cli_detect_writes_a_loadable_profile(tmp_path):
    runner = CliRunner()
    out = tmp_path / "sub" / "edge-box.toml"
    r = runner.invoke(main, ["profiles", "detect", "--no-bandwidth", "--out", str(out)])
    assert r.exit_code == 0, r.output
    prof = load_profile(out)
    assert prof.name == "edge-box" and "PLACEHOLDER" in out.read_text()
    r = runner.invoke(main, ["profiles", "list", "--dir", str(out.parent), "--format", "json"])
    assert [x["name"] for x in json.loads(r.output)] == ["edge-box"]
    # stdout form, measured bandwidth
    r = runner.invoke(main, ["profiles", "detect", "--name", "here", "--device-class", "laptop"])
    assert r.exit_code == 0, r.output
    data = tomllib.loads(r.output)
    assert data["name"] == "here" and data["device_class"] == "laptop" and data["memory"]["bandwidth_gbps"] > 0
    # --name and --out disagreeing is refused
    r = runner.invoke(main, ["profiles", "detect", "--no-bandwidth", "--name", "a", "--out", str(tmp_path / "b.toml")])
    assert r.exit_code != 0 and re.search(r"stem must equal", r.output)


def test_every_profiles_listing_takes_format_json(tmp_path):
    runner = CliRunner()
    out = tmp_path / "box.toml"

    printed = runner.invoke(main, ["profiles", "detect", "--no-bandwidth", "--name", "box", "--format", "json"])
    written = runner.invoke(main, ["profiles", "detect", "--no-bandwidth", "--out", str(out), "--format", "json"])
    shown = runner.invoke(main, ["profiles", "show", "box", "--dir", str(tmp_path), "--format", "json"])

    assert printed.exit_code == 0, printed.output
    d = json.loads(printed.output)
    assert d["name"] == "box" and d["derived"]["ram_bytes"] > 0 and d["memory"]["bandwidth_gbps"] == 1.0
    assert written.exit_code == 0, written.output
    assert json.loads(written.output)["derived"]["path"] == str(out) and load_profile(out).name == "box"
    assert json.loads(shown.output)["name"] == "box"
