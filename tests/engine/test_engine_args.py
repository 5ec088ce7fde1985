"""The command line's engine flags come from EngineConfig itself (engine/engine_args.py)."""
import argparse
import dataclasses

import pytest

from adk_backend.__main__ import parser
from engine import EngineConfig
from engine.engine_args import add_engine_args, engine_options, field_help


def test_every_engine_config_field_is_a_typed_flag_with_its_comment_as_help():
    ap = argparse.ArgumentParser()
    add_engine_args(ap)
    flags = {a.dest: a for a in ap._actions if a.dest != "help"}
    assert set(flags) == {f.name for f in dataclasses.fields(EngineConfig)} - {"model"}
    assert flags["max_num_seqs"].type is int and flags["grammar_compile_timeout"].type is float
    assert flags["preemption_mode"].choices == ["swap", "recompute"]
    assert flags["kv_cache_dtype"].choices == ["auto", "int8"]
    assert isinstance(flags["enable_prefix_caching"], argparse.BooleanOptionalAction)
    assert "most requests in one batch" in flags["max_num_seqs"].help
    docs = field_help()
    assert docs["program_scheduling"].startswith("Admit waiting requests by their agent program's attained service")
    assert all(docs.get(f.name) for f in dataclasses.fields(EngineConfig) if f.name != "model"), "a field without help"


def test_serve_passes_only_the_flags_given_and_they_build_the_config():
    args = parser().parse_args(["serve", "--max-num-seqs", "8", "--no-enable-prefix-caching", "--program-scheduling",
                                "--kv-cache-dtype", "int8", "--num-kv-blocks", "64"])
    options = engine_options(args)
    assert options == {"max_num_seqs": 8, "enable_prefix_caching": False, "program_scheduling": True,
                       "kv_cache_dtype": "int8", "num_kv_blocks": 64}
    config = EngineConfig(model="dummy-tiny", **options)
    assert config.program_kv_retention is True and config.max_num_seqs == 8
    assert engine_options(parser().parse_args(["serve"])) == {}
    with pytest.raises(SystemExit):  # a choice the config does not have is refused by the parser
        parser().parse_args(["serve", "--preemption-mode", "sometimes"])


def test_a_count_that_may_also_be_auto_takes_either_on_the_command_line(capsys):
    for given, value in (("auto", "auto"), ("12", 12)):
        args = parser().parse_args(["serve", "--program-scheduling", "--max-programs-in-progress", given])
        assert engine_options(args)["max_programs_in_progress"] == value
        assert EngineConfig(model="dummy-tiny", **engine_options(args)).max_programs_in_progress == value
    with pytest.raises(SystemExit):
        parser().parse_args(["serve", "--max-programs-in-progress", "many"])
    assert "int or auto" in capsys.readouterr().err
