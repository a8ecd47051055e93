"""The documentation matches the code: documented commands, --help examples, --version, the reference page."""
import argparse
import re
from dataclasses import fields

import pytest
import yaml

from doc_commands import ROOT, check_pages, check_text, documentation_pages, entry_point_parser, entry_points
from inference.options import InferenceOptions
from ldm import __version__

# The commands a user runs (README's table); bench/ scripts are checked for their flags but carry no examples.
USER_ENTRY_POINTS = [script for script in entry_points() if not script.startswith("bench/")]


def test_every_documented_command_matches_its_entry_point():
    problems = check_pages()
    assert problems == [], "\n".join(problems)


def test_the_checker_finds_wrong_flags_choices_paths_targets_and_settings():
    page = """
```bash
python pipeline/test.py --base configs/diffusion/maskdiffusion_test.yaml --exp exp --stepz 50
python pipeline/test.py --base configs/diffusion/maskdiffusion_tests.yaml --sampler plms inference.ddim_step=5
torchrun --nproc-per-node 2 --bogus 1 pipeline/preprocess.py cts.txt exp attributes.txt
make demo lint
cd pipeline
python main.py --base configs/demo/lmnet.yaml -t --name demo --max_steps 2 --gpus=0,1
python main.py --base configs/demo/lmnet.yaml --max-steps 2
```

```text
$ python pipeline/evaluate.py exp --hu-abs 30 --no-such-flag
quality: 8 output(s) --not-a-command
```
"""
    problems = check_text(page, "page.md")
    assert problems == [
        "page.md:3: pipeline/test.py: --stepz is not a flag of its command line",
        "page.md:4: configs/diffusion/maskdiffusion_tests.yaml: no such file in the repository (looked for "
        "pipeline/configs/diffusion/maskdiffusion_tests.yaml)",
        "page.md:4: pipeline/test.py: --sampler plms: not one of ddim, ddpm, dpmpp_2m, dpmpp_2m_sde, unipc",
        "page.md:4: inference.ddim_step: no such inference setting",
        "page.md:5: torchrun: --bogus is not a flag of its command line",
        "page.md:6: make lint: no such target in the Makefile",
        "page.md:9: pipeline/main.py: --max-steps is not a flag of its command line",
        "page.md:13: pipeline/evaluate.py: --no-such-flag is not a flag of its command line",
    ]


def test_the_checker_follows_cd_and_rejects_scripts_that_are_not_there():
    assert check_text("```bash\npython main.py --base configs/demo/lmnet.yaml\n```\n", "a.md") == [
        "a.md:2: main.py: no such script from the block's folder (.; each block starts at the repository root, "
        "`cd` lines move it)"]
    assert check_text("```bash\ncd pipeline && python main.py --base configs/demo/lmnet.yaml -t\n```\n", "a.md") == []
    assert check_text("```python\npython pipeline/test.py --stepz 1\n```\n", "a.md") == []


def test_the_checker_finds_broken_links(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n<a id=\"a-paragraph\"></a>\n**A paragraph.**\n")
    page = ("# Title\n\nSee [other](other.md), [its paragraph](other.md#a-paragraph), [here](#title),\n"
            "[gone](missing.md), [no heading](other.md#nowhere), [the web](https://example.org/x.md).\n")
    assert check_text(page, "page.md", tmp_path) == [
        "page.md:4: link to missing.md: no such file",
        "page.md:4: link to other.md#nowhere: no such heading or anchor",
    ]


def test_the_checker_reads_pages_added_later(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (tmp_path / "README.md").write_text("```bash\nmake test\n```\n")
    (docs / "new_page.md").write_text("```bash\npython pipeline/synthesize.py --ct a.nii.gz --organs liver\n```\n")
    pages = documentation_pages(tmp_path)
    assert [page.name for page in pages] == ["README.md", "new_page.md"]
    assert check_pages(pages) == ["new_page.md:2: pipeline/synthesize.py: --organs is not a flag of its command line"]


@pytest.mark.parametrize("script", USER_ENTRY_POINTS)
def test_help_ends_with_checked_examples_and_version_is_the_projects(script, capsys):
    parser = entry_point_parser(script)
    help_text = parser.format_help().rstrip()
    last_paragraph = help_text.split("\n\n")[-1]
    assert last_paragraph.startswith("examples:"), f"{script}: --help must end with examples"
    examples = [line.strip() for line in last_paragraph.splitlines()[1:]]
    assert 1 <= len(examples) <= 2 and all(script in example for example in examples)
    assert check_text("```bash\n" + "\n".join(examples) + "\n```\n", f"{script} --help") == []
    with pytest.raises(SystemExit) as stopped:
        parser.parse_args(["--version"])
    assert stopped.value.code == 0
    assert capsys.readouterr().out.strip().endswith(f"(LesionDiffusion) {__version__}")


def test_reference_lists_every_flag_of_every_entry_point_and_every_inference_key():
    reference = (ROOT / "docs" / "reference.md").read_text(encoding="utf-8")
    missing = []
    for script in entry_points():
        heading = f"\n## `{script}`\n"
        assert heading in reference, f"docs/reference.md has no section for {script}"
        section = reference.split(heading, 1)[1].split("\n## ", 1)[0]
        for action in entry_point_parser(script)._actions:
            if isinstance(action, argparse._HelpAction):  # -h/--help: every command has it (the page says so)
                continue
            missing += [f"{script} {flag}" for flag in action.option_strings if f"`{flag}`" not in section]
    missing += [f"inference.{item.name}" for item in fields(InferenceOptions)
                if item.name != "stage" and f"`{item.name}`" not in reference]
    assert missing == []


def test_citation_file_names_the_paper():
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))
    assert citation["cff-version"] == "1.2.0"
    paper = citation["preferred-citation"]
    assert paper["title"] == "LesionDiffusion: Towards Text-controlled General Lesion Synthesis"
    assert "arXiv:2503.00741" in [identifier["value"] for identifier in paper["identifiers"]]
    assert "version" not in citation  # the one version is ldm.__version__


def test_the_documented_quality_toml_is_the_default_tolerances():
    import tomllib

    from quality.tolerances import Tolerances, tolerances_from_mapping

    page = (ROOT / "docs" / "quality.md").read_text(encoding="utf-8")
    example = page.split("```toml\n", 1)[1].split("```", 1)[0]
    assert tolerances_from_mapping(tomllib.loads(example)["tolerances"]) == Tolerances()
    assert set(tomllib.loads(example)["tolerances"]) == {item.name for item in fields(Tolerances)}


def test_reference_states_the_code_defaults_of_the_inference_keys():
    reference = (ROOT / "docs" / "reference.md").read_text(encoding="utf-8")
    table = reference.split("\n## The `inference:` block\n", 1)[1]
    documented = dict(re.findall(r"^\| `(\w+)` \| ([^|]*) \|", table, flags=re.M))
    for item in fields(InferenceOptions):
        default = item.default
        if item.name == "stage" or not isinstance(default, (bool, int, float, str, type(None))):
            continue
        expected = "none" if default is None else str(default).lower() if isinstance(default, bool) else str(default)
        assert documented[item.name].strip() == expected, item.name
    assert documented["thresholds"].strip() == ", ".join(map(str, InferenceOptions.thresholds))
