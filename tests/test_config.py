"""Site configuration files and registry files: checked, reported precisely, never echoed."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import pets_widgets as pw
from pets_widgets.coordinator import config
from pets_widgets.core import schema as S
from pets_widgets.site import synthetic
from pets_widgets.site.sources import CsvSource, ParquetSource, SqlSource, SyntheticSource
from pets_widgets.site.validation import validate_rows

from .conftest import TEST_KEY_BITS, TESTING
from .kernel_helpers import kernel_children
from .oracle import expected

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCHEMA = S.Schema(("CSVREG", "SQLREG"))


#: Every site service this module starts is gone when it ends.
pytestmark = pytest.mark.usefixtures("no_leaked_kernels")


def registry(site: str, seed: int, n: int) -> pd.DataFrame:
    rows = synthetic.registry(synthetic.SiteProfile(site, max(1, n // 23)), seed, n)
    return rows.astype({c: str for c in rows.columns if isinstance(rows[c].dtype,
                                                                   pd.CategoricalDtype)})


# --------------------------------------------------------------------------- validation
SENTINELS = {"sex": "Xylophone", "age_at_diagnosis": "77777", "died": "maybe-later",
             "tumour_group": "Quokka", "follow_up_months": "12.5"}


def bad_csv() -> str:
    rows = registry("CSVREG", 1, 30)
    rows = rows.drop(columns=["stage"]).assign(patient_id=range(30))
    rows["sex"] = rows["sex"].astype(object)
    for col, value in SENTINELS.items():
        rows[col] = rows[col].astype(object)
        rows.loc[[2, 17], col] = value  # data rows 3 and 18
    rows.loc[5, "diagnosis_year"] = None  # data row 6: empty
    rows["age_band"] = rows["age_band"].astype(object)
    rows.loc[9, ["age_at_diagnosis", "age_band"]] = [3, "10-14"]  # row 10: inconsistent
    rows.loc[11, "site"] = "ELSEWHERE"
    rows["subtype"] = rows["subtype"].astype(object)
    rows.loc[20, ["tumour_group", "subtype"]] = ["Leukaemia", "DIPG"]  # row 21: DIPG is CNS
    return rows.to_csv(index=False)


def test_every_bad_column_and_value_is_reported_with_row_numbers_never_echoed():
    raw = pd.read_csv(io.StringIO(bad_csv()), dtype=str, keep_default_na=False,
                      na_values=[""])
    with pytest.raises(pw.DataValidationError) as info:
        validate_rows(raw, SCHEMA, "CSVREG", "test.csv")
    exc = info.value
    found = {(p.column, p.problem.split(" ")[1] if p.rows else p.problem, p.rows)
             for p in exc.problems}
    assert ("stage", "is missing", ()) in found
    assert any(p.column == "patient_id" and not p.rows for p in exc.problems)
    by_column = {}
    for p in exc.problems:
        by_column.setdefault(p.column, []).append(p)
    for col in SENTINELS:
        assert any(p.rows == (3, 18) for p in by_column[col]), (col, by_column[col])
    assert [p.rows for p in by_column["diagnosis_year"]] == [(6,)]
    assert [p.rows for p in by_column["age_band"]] == [(10,)]
    assert [p.rows for p in by_column["site"]] == [(12,)]
    assert [(p.rows, p.problem) for p in by_column["subtype"]] == [
        ((21,), "is not possible in this tumour_group")]
    assert "allowed range 0-14" in str(exc) and "'F', 'M'" in str(exc)
    text = str(exc) + repr(exc.problems)
    for value in [*SENTINELS.values(), "ELSEWHERE"]:
        assert value not in text
    assert exc.site == "CSVREG" and "test.csv" in str(exc)


def test_a_clean_file_loads_in_schema_order_and_dtypes(tmp_path):
    rows = registry("CSVREG", 2, 200)
    path = tmp_path / "ok.csv"
    rows.drop(columns=["site"]).sample(frac=1, axis=1, random_state=1).to_csv(path, index=False)
    loaded = CsvSource(str(path)).load(SCHEMA, "CSVREG")
    assert list(loaded.columns) == list(SCHEMA.names)
    assert loaded["died"].dtype == bool and loaded["age_at_diagnosis"].dtype == np.int64
    pd.testing.assert_frame_equal(loaded, synthetic.as_schema_dtypes(rows.assign(
        site="CSVREG")).astype({"site": object}))


def test_unreadable_and_empty_files_are_data_errors(tmp_path):
    with pytest.raises(pw.DataValidationError, match="does not exist"):
        CsvSource(str(tmp_path / "missing.csv")).load(SCHEMA, "CSVREG")
    (tmp_path / "empty.csv").write_text(",".join(S.Schema(("X",)).names) + "\n")
    with pytest.raises(pw.DataValidationError, match="no data rows"):
        CsvSource(str(tmp_path / "empty.csv")).load(SCHEMA, "CSVREG")
    big = registry("CSVREG", 3, 50)
    with pytest.raises(pw.DataValidationError, match="capacity of 40"):
        validate_rows(big, SCHEMA, "CSVREG", "big", capacity=40)


def test_example_csv_is_the_documented_synthetic_registry():
    spec = __import__("importlib").util.spec_from_file_location(
        "make_example", EXAMPLES / "make_registry_example.py")
    module = __import__("importlib").util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = synthetic.registry(synthetic.SiteProfile(module.SITE, module.CASES_PER_YEAR),
                              module.SEED, module.ROWS)
    assert rows.to_csv(index=False, lineterminator="\n") == \
        (EXAMPLES / "registry_example.csv").read_text()
    person_years = synthetic.population(synthetic.SiteProfile(module.SITE, module.CASES_PER_YEAR))
    assert person_years.drop(columns=["site"]).to_csv(index=False, lineterminator="\n") == \
        (EXAMPLES / "registry_example_population.csv").read_text()
    cfg = config.load_config(EXAMPLES / "sites.toml")
    assert config.read_population(cfg.sites[2].population, "NORDIC").person_years.sum() > 0
    assert cfg.site_names == ("NDRS", "NCI", "NORDIC")
    assert {s.backend for s in cfg.sites} == {"service"}  # each started here as a service
    nordic = cfg.sites[2].source
    assert isinstance(nordic, CsvSource) and Path(nordic.path).is_absolute()
    assert len(nordic.load(S.Schema(cfg.site_names), "NORDIC")) == module.ROWS


# --------------------------------------------------------------------------- config files
@pytest.mark.parametrize(("text", "message"), [
    ('[[sites]]\nname = "A"\nbackend = "cloud"\nsource = {kind = "synthetic", seed = 1, '
     'size = 10}', "backend 'cloud'"),
    ('[[sites]]\nname = "A"\nsource = {kind = "synthetic", seed = 1, size = 10}\ncolour = 1',
     "unknown keys \\['colour'\\]"),
    ('[[sites]]\nname = "A"\nbackend = "gateway"\ntoken = "s3cret"\n'
     'source = {kind = "synthetic", seed = 1, size = 10}', "never put a token in the file"),
    ('[[sites]]\nname = "A"\nbackend = "gateway"\ntoken_env = "T"\n'
     'source = {kind = "synthetic", seed = 1, size = 10}', "gateway backend is gone"),
    ('[[sites]]\nname = "A"\nbackend = "service"\nurl = "http://h:1/"\ntoken_env = "T"\n'
     'source = {kind = "synthetic", seed = 1, size = 10}', "takes only"),
    ('[[sites]]\nname = "A"\nbackend = "service"\nurl = "http://h:1/"\ntoken_env = "T"\n',
     "verify_key"),
    ('[[sites]]\nname = "A"\nbackend = "service"\nurl = "http://h:1/"\nverify_key = "'
     + "a" * 64 + '"', "needs token_env"),
    ('[[sites]]\nname = "A"\ntoken_env = "T"\nsource = {kind = "synthetic", seed = 1, '
     'size = 10}', "reached by its url"),
    ('[[sites]]\nname = "A"\nsource = {kind = "excel", path = "x.xlsx"}', "source kind 'excel'"),
    ('[[sites]]\nname = "A"\nsource = {kind = "sql", url = "sqlite://"}', "exactly one of"),
    ('[[sites]]\nname = "A"\nsource = {kind = "sql", url = "sqlite://", table = "x; drop"}',
     "not a plain identifier"),
    ('[[sites]]\nname = "A"\nsource = {kind = "synthetic", seed = 1, size = 10}\n'
     '[[sites]]\nname = "A"\nsource = {kind = "synthetic", seed = 2, size = 10}', "unique"),
    ('[federation]\nkey_bits = 512\n[[sites]]\nname = "A"\n'
     'source = {kind = "synthetic", seed = 1, size = 10}', "key_bits"),
    ("[federation]\n", "at least one site"),
    ("sites = [", "not valid TOML"),
])
def test_bad_config_files_say_what_to_fix(tmp_path, text, message):
    path = tmp_path / "sites.toml"
    path.write_text(text)
    with pytest.raises(pw.ConfigError, match=message):
        pw.Federation.from_config(path)


def test_relative_paths_are_read_next_to_the_config_file(tmp_path):
    path = tmp_path / "sites.toml"
    path.write_text('[[sites]]\nname = "A"\nsource = {kind = "csv", path = "a.csv"}\n'
                    '[[sites]]\nname = "B"\nbackend = "local"\n'
                    'source = {kind = "sql", url = "sqlite:///b.sqlite", table = "t"}\n'
                    '[[sites]]\nname = "C"\nbackend = "service"\nurl = "http://h:1"\n'
                    'token_env = "T"\nverify_key = "' + "b" * 64 + '"\nca_file = "ca.pem"\n')
    cfg = config.load_config(path)
    assert cfg.sites[0].source == CsvSource(str(tmp_path / "a.csv"))
    assert cfg.sites[1].source == SqlSource(f"sqlite:///{tmp_path / 'b.sqlite'}", table="t")
    assert cfg.sites[2].source is None  # a service's data is its registry's business
    assert cfg.sites[2].ca_file == str(tmp_path / "ca.pem")
    assert cfg.sites[0].backend == "service" and cfg.sites[0].url is None  # started here


# --------------------------------------------------------------------------- real files
@pytest.fixture(scope="module")
def registry_files(tmp_path_factory):
    """A CSV registry and an SQLite registry on disk, and a config listing both."""
    import sqlalchemy

    folder = tmp_path_factory.mktemp("registries")
    registry("CSVREG", 21, 900).to_csv(folder / "csvreg.csv", index=False)
    engine = sqlalchemy.create_engine(f"sqlite:///{folder / 'sqlreg.sqlite'}")
    with engine.begin() as conn:
        registry("SQLREG", 22, 700).drop(columns=["site"]).to_sql("registry", conn,
                                                                  index=False)
    engine.dispose()
    for name, per_year in (("CSVREG", 40), ("SQLREG", 30)):  # public person-years, no site col
        population(name, per_year).drop(columns=["site"]).to_csv(folder / f"{name}-py.csv",
                                                                 index=False)
    for backend in ("service", "local"):
        (folder / f"{backend}.toml").write_text(f"""
[federation]
key_bits = 2048

[[sites]]
name = "CSVREG"
backend = "{backend}"
source = {{ kind = "csv", path = "csvreg.csv" }}
population = "CSVREG-py.csv"

[[sites]]
name = "SQLREG"
backend = "{backend}"
source = {{ kind = "sql", url = "sqlite:///sqlreg.sqlite", table = "registry" }}
population = "SQLREG-py.csv"
""")
    return folder


def population(site: str, per_year: int) -> pd.DataFrame:
    return synthetic.population(synthetic.SiteProfile(site, per_year, 0.0))


@pytest.fixture(scope="module")
def file_feds(registry_files):
    feds = {b: pw.Federation.from_config(registry_files / f"{b}.toml", key_bits=TEST_KEY_BITS,
                                         ledger=registry_files / f"{b}.sqlite", **TESTING)
            for b in ("service", "local")}
    yield feds
    for fed in feds.values():
        fed.close()


@pytest.mark.slow
@pytest.mark.parametrize("spec", [
    pw.Count(by=["site", "tumour_group"]),
    pw.Crosstab(rows="age_band", cols="stage", where={"died": [True]}),
    pw.Mean(variable="follow_up_months", by=["sex"]),
    pw.Histogram(variable="diagnosis_year"),
    pw.Survival(by="sex", horizon_months=36, interval_months=6),
    pw.IncidenceRate(by="tumour_group"),
], ids=lambda s: s.describe())
def test_csv_and_sqlite_site_services_equal_local_sites_and_pandas(file_feds, spec):
    kernel, local = file_feds["service"], file_feds["local"]
    assert [s.backend for s in kernel._sites] == ["service", "service"]
    got = pw.testing.noiseless(kernel, spec)
    pd.testing.assert_frame_equal(got.table, pw.testing.noiseless(local, spec).table)
    # Survival's own oracle is lifelines (test_survival), rates' a hand computation below.
    if not isinstance(spec, (pw.Survival, pw.IncidenceRate)):
        want = expected(spec, pw.testing.pooled_rows(kernel), kernel.schema)
        np.testing.assert_array_equal(got.table.to_numpy(float), want.to_numpy(float))
    status = kernel.status()
    assert status["rows"].tolist() == [900, 700] and status["alive"].all()
    assert kernel.enclave.key_bits == TEST_KEY_BITS  # the argument overrides the file


@pytest.mark.slow
def test_population_files_give_rates_equal_to_a_hand_computation(file_feds, registry_files):
    fed = file_feds["service"]
    got = pw.testing.noiseless(fed, pw.IncidenceRate(by="tumour_group")).table
    rows = pw.testing.pooled_rows(fed)
    person_years = sum(population(n, p).person_years.sum()
                       for n, p in (("CSVREG", 40), ("SQLREG", 30)))
    cases = rows.groupby("tumour_group", observed=False).size()
    for group, n in cases.items():
        assert got.loc[group, "cases"] == n
        assert got.loc[group, "crude_rate"] == pytest.approx(n / person_years * 1e6, rel=1e-12)


def test_a_bad_population_file_is_a_config_error_naming_it(tmp_path):
    (tmp_path / "py.csv").write_text("diagnosis_year,sex,age_band,person_years\n2001,X,<1,5\n")
    with pytest.raises(pw.ConfigError, match=r"py\.csv.*sex"):
        config.read_population(str(tmp_path / "py.csv"), "A")
    with pytest.raises(pw.ConfigError, match="does not exist"):
        config.read_population(str(tmp_path / "none.csv"), "A")
    (tmp_path / "other.csv").write_text(
        "site,diagnosis_year,sex,age_band,person_years\nB,2001,F,<1,5\n")
    with pytest.raises(pw.ConfigError, match="other sites"):
        config.read_population(str(tmp_path / "other.csv"), "A")
    header = "diagnosis_year,sex,age_band,person_years\n"
    for body, problem in (("", "no rows"), ("2001.7,F,<1,5\n", "whole years"),
                          ("2001,F,<1,5\n2001,F,<1,6\n", "counted twice")):
        (tmp_path / "p.csv").write_text(header + body)
        with pytest.raises(pw.ConfigError, match=problem):
            config.read_population(str(tmp_path / "p.csv"), "A")


@pytest.mark.slow
def test_a_bad_file_at_a_site_service_is_reported_by_rule_and_count_only(tmp_path):
    before = {p.pid for p in kernel_children()}
    (tmp_path / "bad.csv").write_text(bad_csv().replace("CSVREG", "K"))
    (tmp_path / "sites.toml").write_text(
        '[[sites]]\nname = "K"\nsource = {kind = "csv", path = "bad.csv"}\n'
        '[[sites]]\nname = "S"\nsource = {kind = "synthetic", seed = 1, size = 100}\n')
    with pytest.raises(pw.SiteError) as info:
        pw.Federation.from_config(tmp_path / "sites.toml", key_bits=TEST_KEY_BITS,
                                  ledger=tmp_path / "ledger.sqlite")
    exc = info.value
    # What leaves the site: the rule broken and how many rows break it; no row number,
    # no value, not even where the file is.
    assert exc.site == "K" and exc.rule == "data" and "bad.csv" not in str(exc)
    assert "column 'sex', 2 rows" in str(exc) and "18" not in str(exc)
    for value in SENTINELS.values():
        assert value not in str(exc)
    deadline = time.monotonic() + 20
    while {p.pid for p in kernel_children()} - before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert {p.pid for p in kernel_children()} <= before  # the healthy site stopped too


def test_parquet_source(tmp_path):
    pytest.importorskip("pyarrow")
    rows = registry("CSVREG", 4, 120)
    rows.to_parquet(tmp_path / "r.parquet")
    loaded = ParquetSource(str(tmp_path / "r.parquet")).load(SCHEMA, "CSVREG")
    assert len(loaded) == 120


def test_synthetic_source_equals_the_demo_registry():
    profile = synthetic.profiles(2, 500)[1]
    source = SyntheticSource(7, 500, profile.cases_per_year, profile.loss_to_follow_up)
    pd.testing.assert_frame_equal(source.load(S.Schema(("NDRS", "NCI")), "NCI"),
                                  synthetic.registry(profile, 7, 500))
    with pytest.raises(pw.ConfigError, match="size"):
        SyntheticSource(7)
