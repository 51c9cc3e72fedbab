"""The GDC importer (wsiomics.gdc) on generated trees in gdc-client's exact layout, and the TCGA configs.

A tree is ``downloads/<file uuid>/<file name>`` with TCGA slide names (``TCGA-05-4244-01Z-00-DX1.<uuid>.svs``)
and STAR files (``<uuid>.rna_seq.augmented_star_gene_counts.tsv``, real GDC content), listed by portal sample
sheets in both layouts and by gdc-client manifests.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from wsiomics.expression.readers import choose_samples
from wsiomics.gdc import CLASSIC_COLUMNS, MANIFEST_COLUMNS, NEW_COLUMNS, GdcError, build_sheet, main, unplaced_path
from wsiomics.samples import load_sample_sheet
from wsiomics.synth.expression import gene_model, sample_counts, write_gdc_counts

REPO = Path(__file__).resolve().parents[1]
SAMPLE_TYPE_NAMES = {"01": "Primary Tumor", "02": "Recurrent Tumor", "06": "Metastatic", "11": "Solid Tissue Normal"}
DESCRIPTORS = {"01": ("Tumor", "Primary"), "02": ("Tumor", "Recurrence"), "06": ("Tumor", "Metastatic"),
               "11": ("Normal", "Not Applicable")}


def file_uuid(*key: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "/".join(key)))


class GdcTree:
    """A gdc-client download folder plus the sheet rows that describe it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.downloads = root / "downloads"
        self.downloads.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = []
        self.genes = gene_model(20, seed=0)
        self.rng = np.random.default_rng(0)

    def _put(self, file_id: str, name: str, download: str) -> None:
        folder = self.downloads / file_id
        folder.mkdir(exist_ok=True)
        (folder / "logs").mkdir(exist_ok=True)
        (folder / "logs" / f"{name}.parcel").write_text("log")
        if download == "yes":
            if name.endswith(".tsv"):
                write_gdc_counts(folder / name, self.genes, sample_counts(self.genes, 0, self.rng), self.rng)
            else:
                (folder / name).write_bytes(b"II*\x00 not really a slide " + file_id.encode())
        elif download == "partial":
            (folder / f"{name}.partial").write_bytes(b"II*\x00")

    def slide(self, case: str, sample: str = "01Z", section: str = "DX1", project: str = "TCGA-LUAD",
              download: str = "yes", listed_case: str | None = None, name: str | None = None) -> dict:
        barcode = f"{case}-{sample}-00-{section}"
        file_id = file_uuid(barcode, name or "", str(len(self.rows)))
        name = name or f"{barcode}.{file_uuid('slide', barcode).upper()}.svs"
        if download != "no":
            self._put(file_id, name, download)
        code = sample[:2]
        row = {"File ID": file_id, "File Name": name, "Data Category": "Biospecimen", "Data Type": "Slide Image",
               "Project ID": project, "Case ID": case if listed_case is None else listed_case,
               "Sample ID": f"{case}-{sample}" if listed_case is None else "", "code": code,
               "preservation": "FFPE" if section.startswith("DX") else "OCT"}
        self.rows.append(row)
        return row

    def rna(self, case: str, sample: str = "01A", project: str = "TCGA-LUAD", download: str = "yes") -> dict:
        file_id = file_uuid(case, sample, "rna", str(len(self.rows)))
        name = f"{file_uuid('rna', file_id)}.rna_seq.augmented_star_gene_counts.tsv"
        if download != "no":
            self._put(file_id, name, download)
        row = {"File ID": file_id, "File Name": name, "Data Category": "Transcriptome Profiling",
               "Data Type": "Gene Expression Quantification", "Project ID": project, "Case ID": case,
               "Sample ID": f"{case}-{sample}", "code": sample[:2], "preservation": "Unknown"}
        self.rows.append(row)
        return row

    def other(self, case: str, project: str = "TCGA-LUAD") -> dict:
        file_id = file_uuid(case, "xml")
        name = f"nationwidechildrens.org_clinical.{case}.xml"
        self._put(file_id, name, "yes")
        row = {"File ID": file_id, "File Name": name, "Data Category": "Clinical", "Data Type": "Clinical Supplement",
               "Project ID": project, "Case ID": case, "Sample ID": "", "code": "", "preservation": ""}
        self.rows.append(row)
        return row

    def sheet(self, name: str, rows: list[dict], layout: str = "classic") -> Path:
        """A portal sample sheet: the classic 8 columns or the newer 11."""
        records = []
        for r in rows:
            rec = {c: r[c] for c in CLASSIC_COLUMNS[:7]}
            if layout == "classic":
                rec["Sample Type"] = SAMPLE_TYPE_NAMES.get(r["code"], "")
            else:
                tissue, descriptor = DESCRIPTORS.get(r["code"], ("", ""))
                rec.update({"Tissue Type": tissue, "Tumor Descriptor": descriptor,
                            "Specimen Type": "Solid Tissue" if r["code"] else "",
                            "Preservation Method": r["preservation"]})
            records.append(rec)
        columns = list(CLASSIC_COLUMNS if layout == "classic" else NEW_COLUMNS)
        path = self.root / name
        pd.DataFrame(records, columns=columns).to_csv(path, sep="\t", index=False)
        return path

    def manifest(self, name: str, rows: list[dict], sizes: dict[str, int] | None = None) -> Path:
        """A gdc-client manifest (id filename md5 size state)."""
        records = []
        for r in rows:
            f = self.downloads / r["File ID"] / r["File Name"]
            data = f.read_bytes() if f.is_file() else b""
            size = (sizes or {}).get(r["File ID"], len(data))
            records.append({"id": r["File ID"], "filename": r["File Name"], "md5": hashlib.md5(data).hexdigest(),
                            "size": size, "state": "released"})
        path = self.root / name
        pd.DataFrame(records, columns=list(MANIFEST_COLUMNS)).to_csv(path, sep="\t", index=False)
        return path

    def path(self, row: dict) -> str:
        return str((self.downloads / row["File ID"] / row["File Name"]).resolve())


@pytest.fixture
def nsclc(tmp_path: Path) -> tuple[GdcTree, dict[str, dict], list[Path]]:
    """LUAD (classic sheet) and LUSC (newer sheet) with every edge case the importer must report."""
    t = GdcTree(tmp_path)
    f = {
        # TCGA-05-4244: diagnostic + frozen slide; tumour and normal RNA
        "a_dx": t.slide("TCGA-05-4244"), "a_ts": t.slide("TCGA-05-4244", "01A", "TS1"),
        "a_rna": t.rna("TCGA-05-4244", "01A"), "a_rna_normal": t.rna("TCGA-05-4244", "11A"),
        "a_xml": t.other("TCGA-05-4244"),
        # TCGA-05-4249: two diagnostic slides (both kept); RNA of vials A and B (A wins); a normal-tissue slide
        "b_dx1": t.slide("TCGA-05-4249"), "b_dx2": t.slide("TCGA-05-4249", section="DX2"),
        "b_rna_b": t.rna("TCGA-05-4249", "01B"), "b_rna_a": t.rna("TCGA-05-4249", "01A"),
        "b_normal_slide": t.slide("TCGA-05-4249", "11A", "TS1"),
        # a slide whose name has no barcode and whose row has no case
        "orphan": t.slide("TCGA-05-4250", listed_case="", name="scan_0001.svs"),
        # LUSC
        "c_dx": t.slide("TCGA-18-3406", project="TCGA-LUSC"),
        # the same slide barcode again (a re-scan: another file UUID), sorting after c_dx: a duplicate
        "c_dup": t.slide("TCGA-18-3406", project="TCGA-LUSC",
                         name="TCGA-18-3406-01Z-00-DX1.FFFFFFFF-0000-4000-8000-000000000000.svs"),
        "d_rna": t.rna("TCGA-21-1070", project="TCGA-LUSC"),
        "d_dx_missing": t.slide("TCGA-21-1070", project="TCGA-LUSC", download="no"),
        "e_dx": t.slide("TCGA-22-4593", project="TCGA-LUSC"),
        "e_rna_02": t.rna("TCGA-22-4593", "02A", project="TCGA-LUSC"),
        "e_rna_06": t.rna("TCGA-22-4593", "06A", project="TCGA-LUSC"),
        "e_rna_partial": t.rna("TCGA-22-4594", "01A", project="TCGA-LUSC", download="partial"),
        # TCGA-22-5471: a metastatic-sample slide next to a primary one (the primary's are used)
        "f_dx": t.slide("TCGA-22-5471", project="TCGA-LUSC"),
        "f_dx_met": t.slide("TCGA-22-5471", "06Z", project="TCGA-LUSC"),
    }
    luad = [v for k, v in f.items() if k[0] in "ab" or k == "orphan"]
    lusc = [v for k, v in f.items() if k[0] in "cdef"]
    sheets = [t.sheet("gdc_sample_sheet.luad.tsv", luad, "classic"), t.sheet("gdc_sample_sheet.lusc.tsv", lusc, "new")]
    # downloaded, but in no sheet
    t._put(file_uuid("stray"), "TCGA-99-0000-01Z-00-DX1.ABC.svs", "yes")
    return t, f, sheets


def reasons(result) -> dict[str, str]:
    return dict(zip(result.unplaced["file_id"], result.unplaced["reason"], strict=True))


def test_nsclc_sheet_places_every_file_or_says_why(nsclc, tmp_path: Path) -> None:
    t, f, sheets = nsclc
    result = build_sheet(sheets, [t.downloads], label="project")
    sheet = result.sheet
    expected = [  # patient, slide_id, file of the slide, label, RNA file
        ("TCGA-05-4244", "TCGA-05-4244-01Z-00-DX1", "a_dx", "TCGA-LUAD", "a_rna"),
        ("TCGA-05-4249", "TCGA-05-4249-01Z-00-DX1", "b_dx1", "TCGA-LUAD", "b_rna_a"),
        ("TCGA-05-4249", "TCGA-05-4249-01Z-00-DX2", "b_dx2", "TCGA-LUAD", "b_rna_a"),
        ("TCGA-18-3406", "TCGA-18-3406-01Z-00-DX1", "c_dx", "TCGA-LUSC", None),
        ("TCGA-21-1070", "", None, "TCGA-LUSC", "d_rna"),
        ("TCGA-22-4593", "TCGA-22-4593-01Z-00-DX1", "e_dx", "TCGA-LUSC", "e_rna_02"),
        ("TCGA-22-5471", "TCGA-22-5471-01Z-00-DX1", "f_dx", "TCGA-LUSC", None),
    ]
    got = list(sheet[["patient_id", "slide_id", "slide_path", "label", "expression_path"]].itertuples(index=False))
    want = [(p, s, t.path(f[sf]) if sf else "", lab, t.path(f[rf]) if rf else "") for p, s, sf, lab, rf in expected]
    assert [tuple(r) for r in got] == want

    why = reasons(result)
    assert why[f["a_ts"]["File ID"]].startswith("slide kind frozen")
    assert why[f["a_rna_normal"]["File ID"]].startswith("RNA of a normal sample (type 11)")
    assert why[f["a_xml"]["File ID"]].startswith("not a slide image or STAR gene counts file")
    assert why[f["b_rna_b"]["File ID"]].startswith("another sample of the patient ranks first")
    assert why[f["b_normal_slide"]["File ID"]].startswith("slide kind frozen")  # filtered by kind first
    assert why[f["orphan"]["File ID"]].startswith("slide without a case")
    assert why[f["d_dx_missing"]["File ID"]].startswith("missing download")
    assert why[f["e_rna_06"]["File ID"]].startswith("another sample of the patient ranks first")
    assert why[f["e_rna_partial"]["File ID"]].startswith("incomplete download")
    assert why[f["f_dx_met"]["File ID"]].startswith("slide of sample type 06")
    # the duplicate: the slide barcode seen twice; the smaller file name is used, the other reported
    assert why[f["c_dup"]["File ID"]].startswith(f"duplicate: slide TCGA-18-3406-01Z-00-DX1 is also file "
                                                 f"{f['c_dx']['File ID']}")
    assert why[file_uuid("stray")].startswith("downloaded but listed in none")
    # nothing silently dropped: every listed or downloaded file is placed or unplaced, exactly once
    downloaded = {p.name for p in t.downloads.iterdir()}
    listed = {r["File ID"] for r in f.values()}
    placed = {Path(p).parent.name for col in ("slide_path", "expression_path") for p in sheet[col] if p}
    assert placed.isdisjoint(why) and placed | set(why) == listed | downloaded
    assert len(result.unplaced) == len(set(result.unplaced["file_id"]))

    out = tmp_path / "out" / "samples.tsv"
    from wsiomics.gdc import write_result

    loaded = write_result(result, out)
    assert unplaced_path(out) == tmp_path / "out" / "samples.unplaced.tsv" and unplaced_path(out).is_file()
    assert list(loaded["slide_id"]) == [e[1] for e in expected]
    assert list(loaded["patient_id"]) == [e[0] for e in expected]
    # --relative: the same sheet with paths relative to its folder
    rel = write_result(result, tmp_path / "rel" / "samples.tsv", relative=True)
    assert list(rel["slide_path"]) == list(loaded["slide_path"])
    assert not any(Path(p).is_absolute() for p in pd.read_csv(tmp_path / "rel" / "samples.tsv", sep="\t",
                                                               keep_default_na=False)["slide_path"] if p)


def test_rna_choice_is_the_expression_stage_rule(tmp_path: Path) -> None:
    """The importer picks the sample expression.sample_types would pick (readers.choose_samples)."""
    t = GdcTree(tmp_path)
    samples = ["06A", "01B", "02A", "11A", "01A"]
    rows = [t.rna("TCGA-AA-0001", s) for s in samples]
    for order in (("01", "03", "02", "05", "06"), ("06", "02"), ("02", "01")):
        result = build_sheet([t.sheet("s.tsv", rows)], [t.downloads], sample_types=order)
        chosen = Path(result.sheet["expression_path"].iloc[0]).parent.name
        picked = next(r for r in rows if r["File ID"] == chosen)["Sample ID"]
        table = choose_samples(pd.Index([r["Sample ID"] for r in rows]), {"TCGA-AA-0001"}, order)
        assert picked == table.loc[table["chosen"], "sample"].item()
        assert len(result.unplaced) == len(samples) - 1


def test_frozen_and_all_slides(nsclc) -> None:
    t, f, sheets = nsclc
    frozen = build_sheet(sheets, [t.downloads], slides="frozen")
    assert list(frozen.sheet["slide_id"].loc[lambda s: s != ""]) == ["TCGA-05-4244-01A-00-TS1"]
    assert reasons(frozen)[f["b_normal_slide"]["File ID"]].startswith("slide of a normal sample (type 11)")
    everything = build_sheet(sheets, [t.downloads], slides="all")
    a = everything.sheet[everything.sheet["patient_id"] == "TCGA-05-4244"]
    assert list(a["slide_id"]) == ["TCGA-05-4244-01A-00-TS1", "TCGA-05-4244-01Z-00-DX1"]
    assert "label" not in everything.sheet.columns  # no --label: no label column


def test_manifest_alone_places_slides_by_barcode_and_reports_rna(nsclc) -> None:
    t, f, _ = nsclc
    rows = [f["a_dx"], f["a_rna"], f["c_dx"]]
    result = build_sheet([t.manifest("gdc_manifest.txt", rows)], [t.downloads])
    assert list(result.sheet["slide_id"]) == ["TCGA-05-4244-01Z-00-DX1", "TCGA-18-3406-01Z-00-DX1"]
    assert list(result.sheet["patient_id"]) == ["TCGA-05-4244", "TCGA-18-3406"]
    assert (result.sheet["expression_path"] == "").all()
    assert reasons(result)[f["a_rna"]["File ID"]].startswith("RNA file without a case")
    # the manifest and the sheet together: the sheet gives the RNA its case, the manifest the sizes
    both = build_sheet([t.manifest("m.txt", rows), t.sheet("s.tsv", rows)], [t.downloads])
    assert both.sheet.loc[both.sheet["patient_id"] == "TCGA-05-4244", "expression_path"].item() == t.path(f["a_rna"])


def test_manifest_size_mismatch_is_an_incomplete_download(nsclc) -> None:
    t, f, _ = nsclc
    manifest = t.manifest("m.txt", [f["a_dx"]], sizes={f["a_dx"]["File ID"]: 10**9})
    result = build_sheet([manifest], [t.downloads])
    assert result.sheet.empty
    assert reasons(result)[f["a_dx"]["File ID"]].startswith("incomplete download")


def test_several_download_folders_and_sheets_listing_a_file_twice(nsclc, tmp_path: Path) -> None:
    t, f, sheets = nsclc
    second = tmp_path / "more"
    moved = f["d_dx_missing"]
    (second / moved["File ID"]).mkdir(parents=True)
    (second / moved["File ID"] / moved["File Name"]).write_bytes(b"II*\x00")
    result = build_sheet([*sheets, sheets[0]], [t.downloads, second], label="project")  # LUAD sheet twice
    assert "TCGA-21-1070-01Z-00-DX1" in set(result.sheet["slide_id"])
    assert len(result.unplaced) == len(build_sheet(sheets, [t.downloads], label="project").unplaced) - 1


def write_tsv(path: Path, records: list[dict]) -> Path:
    pd.DataFrame(records).to_csv(path, sep="\t", index=False)
    return path


def test_label_and_survival_from_gdc_clinical(nsclc, tmp_path: Path) -> None:
    t, f, sheets = nsclc
    clinical = write_tsv(tmp_path / "clinical.tsv", [
        # several rows per case (one per treatment); "'--" is GDC's empty cell
        {"case_submitter_id": "TCGA-05-4244", "vital_status": "Dead", "days_to_death": "402",
         "days_to_last_follow_up": "'--", "ajcc_pathologic_stage": "Stage IB"},
        {"case_submitter_id": "TCGA-05-4244", "vital_status": "Dead", "days_to_death": "402",
         "days_to_last_follow_up": "'--", "ajcc_pathologic_stage": "'--"},
        {"case_submitter_id": "TCGA-05-4249", "vital_status": "Alive", "days_to_death": "'--",
         "days_to_last_follow_up": "1523", "ajcc_pathologic_stage": "Stage IA"},
        {"case_submitter_id": "TCGA-05-4249", "vital_status": "Alive", "days_to_death": "'--",
         "days_to_last_follow_up": "1600", "ajcc_pathologic_stage": "Stage IA"},
        {"case_submitter_id": "TCGA-18-3406", "vital_status": "Not Reported", "days_to_death": "'--",
         "days_to_last_follow_up": "'--", "ajcc_pathologic_stage": "Stage IIB"},
        {"case_submitter_id": "TCGA-21-1070", "vital_status": "Alive", "days_to_death": "'--",
         "days_to_last_follow_up": "12", "ajcc_pathologic_stage": "'--"},
        {"case_submitter_id": "TCGA-22-4593", "vital_status": "Alive", "days_to_death": "'--",
         "days_to_last_follow_up": "0", "ajcc_pathologic_stage": "Stage IA"},
        {"case_submitter_id": "TCGA-22-4593", "vital_status": "Alive", "days_to_death": "'--",
         "days_to_last_follow_up": "0", "ajcc_pathologic_stage": "Stage IIA"},
    ])
    result = build_sheet(sheets, [t.downloads], label="column:ajcc_pathologic_stage", clinical=[clinical])
    per_patient = result.sheet.drop_duplicates("patient_id").set_index("patient_id")
    assert per_patient["label"].to_dict() == {"TCGA-05-4244": "Stage IB", "TCGA-05-4249": "Stage IA",
                                              "TCGA-18-3406": "Stage IIB"}
    assert per_patient.loc["TCGA-05-4244", ["time", "event"]].tolist() == ["402", "1"]
    assert per_patient.loc["TCGA-05-4249", ["time", "event"]].tolist() == ["1600", "0"]  # last follow-up
    assert per_patient.loc["TCGA-18-3406", ["time", "event"]].tolist() == ["", ""]  # vital status not reported
    why = reasons(result)
    assert why[f["d_rna"]["File ID"]].startswith("no label for case TCGA-21-1070: clinical column "
                                                 "ajcc_pathologic_stage is empty")
    assert "conflicting values 'Stage IA', 'Stage IIA'" in why[f["e_dx"]["File ID"]]
    assert why[f["f_dx"]["File ID"]].endswith("not in the clinical table")


def test_pancancer_table_gives_label_and_os(nsclc, tmp_path: Path) -> None:
    t, f, sheets = nsclc
    table = write_tsv(tmp_path / "TCGA-CDR.tsv", [
        {"bcr_patient_barcode": b, "type": ty, "histological_type": h, "OS": os_, "OS.time": ost}
        for b, ty, h, os_, ost in [
            ("TCGA-05-4244", "LUAD", "Lung Adenocarcinoma", "1", "402"),
            ("TCGA-05-4249", "LUAD", "Lung Adenocarcinoma", "0", "1600"),
            ("TCGA-18-3406", "LUSC", "[Not Available]", "0", "#N/A"),
            ("TCGA-21-1070", "LUSC", "Lung Squamous Cell Carcinoma", "1", "12.5"),
            ("TCGA-22-4593", "LUSC", "Lung Squamous Cell Carcinoma", "0", "0"),
            ("TCGA-22-5471", "LUSC", "Lung Squamous Cell Carcinoma", "", ""),
        ]])
    result = build_sheet(sheets, [t.downloads], label="column:type", clinical=[table])
    per_patient = result.sheet.drop_duplicates("patient_id").set_index("patient_id")
    assert per_patient["label"].to_dict() == {"TCGA-05-4244": "LUAD", "TCGA-05-4249": "LUAD", "TCGA-18-3406": "LUSC",
                                              "TCGA-21-1070": "LUSC", "TCGA-22-4593": "LUSC", "TCGA-22-5471": "LUSC"}
    assert per_patient[["time", "event"]].to_dict("split")["data"] == [
        ["402", "1"], ["1600", "0"], ["", ""], ["12.5", "1"], ["0", "0"], ["", ""]]
    hist = build_sheet(sheets, [t.downloads], label="column:histological_type", clinical=[table])
    assert reasons(hist)[f["c_dx"]["File ID"]].startswith("no label for case TCGA-18-3406")
    with pytest.raises(GdcError, match=r"no such column .*\(close: histological_type\)"):
        build_sheet(sheets, [t.downloads], label="column:histological_typ", clinical=[table])


def test_bad_inputs_are_clear_errors(nsclc, tmp_path: Path) -> None:
    t, _, sheets = nsclc
    bogus = write_tsv(tmp_path / "bogus.tsv", [{"file": "x", "case": "y"}])
    with pytest.raises(GdcError, match="neither a GDC sample sheet nor a gdc-client manifest"):
        build_sheet([bogus], [t.downloads])
    with pytest.raises(GdcError, match="needs --clinical"):
        build_sheet(sheets, [t.downloads], label="column:PAM50")
    with pytest.raises(GdcError, match="not a folder"):
        build_sheet(sheets, [tmp_path / "nope"])
    with pytest.raises(GdcError, match="two-digit TCGA codes"):
        build_sheet(sheets, [t.downloads], sample_types=["1"])


def test_cli_writes_both_tables_and_the_sheet_loads(nsclc, tmp_path: Path) -> None:
    t, _, sheets = nsclc
    clinical = write_tsv(tmp_path / "clinical.tsv", [
        {"cases.submitter_id": c, "demographic.vital_status": v, "demographic.days_to_death": d,
         "diagnoses.days_to_last_follow_up": fu}
        for c, v, d, fu in [("TCGA-05-4244", "Dead", "402", "'--"), ("TCGA-05-4249", "Alive", "'--", "1600")]])
    out = tmp_path / "work" / "samples.tsv"
    cmd = [sys.executable, "-m", "wsiomics.gdc", "sheet", "--sample-sheet", *map(str, sheets), "--downloads",
           str(t.downloads), "--out", str(out), "--label", "project", "--clinical", str(clinical)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "6 patients, 6 slides, 4 patients with RNA" in proc.stdout
    assert "missing download" in proc.stdout and "survival (time, event): 2 of 6 patients" in proc.stdout
    sheet = load_sample_sheet(out)
    assert sheet.set_index("slide_id").loc["TCGA-05-4244-01Z-00-DX1", ["time", "event"]].tolist() == ["402", "1"]
    unplaced = pd.read_csv(unplaced_path(out), sep="\t", keep_default_na=False)
    assert list(unplaced.columns) == ["file_id", "file_name", "kind", "case_id", "sample_id", "listed_in", "path",
                                      "reason"]
    assert (unplaced["reason"] != "").all()
    # nothing placeable: an error, and the reasons still written
    empty_out = tmp_path / "empty" / "samples.tsv"
    assert main(["sheet", "--sample-sheet", str(sheets[0]), "--downloads", str(tmp_path / "work"),
                 "--out", str(empty_out)]) == 1
    assert not empty_out.exists() and unplaced_path(empty_out).is_file()


def test_multiclass_label_from_cbioportal_patient_table(tmp_path: Path) -> None:
    """BRCA PAM50 from cBioPortal's data_clinical_patient.txt: '#' header lines, PATIENT_ID, SUBTYPE."""
    t = GdcTree(tmp_path)
    cases = {"TCGA-A1-A0SB": "BRCA_LumA", "TCGA-A2-A04P": "BRCA_Basal", "TCGA-A2-A0CM": "BRCA_Her2",
             "TCGA-AR-A1AX": "BRCA_LumB", "TCGA-B6-A0RU": "", "TCGA-E2-A1B5": "BRCA_Normal"}
    rows = [row for c in cases for row in (t.slide(c, project="TCGA-BRCA"), t.rna(c, project="TCGA-BRCA"))]
    sheet = t.sheet("brca.tsv", rows, "new")
    lines = ["#Patient Identifier\tSubtype\tOverall Survival (Months)", "#Identifier\tSubtype\tOS",
             "#STRING\tSTRING\tNUMBER", "#1\t1\t1", "PATIENT_ID\tSUBTYPE\tOS_MONTHS"]
    lines += [f"{c}\t{s}\t#N/A" for c, s in cases.items()]
    table = tmp_path / "data_clinical_patient.txt"
    table.write_text("\n".join(lines) + "\n")
    result = build_sheet([sheet], [t.downloads], label="column:SUBTYPE", clinical=[table])
    got = result.sheet.drop_duplicates("patient_id").set_index("patient_id")["label"].to_dict()
    assert got == {c: s for c, s in cases.items() if s}
    assert set(result.unplaced["case_id"]) == {"TCGA-B6-A0RU"} and len(result.unplaced) == 2
    assert "time" not in result.sheet.columns  # no OS/OS.time or vital status: no survival columns
    # a table keyed by sample barcodes (--clinical-id): each barcode counts for its patient
    by_sample = write_tsv(tmp_path / "subtypes.tsv", [{"pan.samplesID": f"{c}-01A-11R-A144-07", "Subtype_mRNA": s}
                                                       for c, s in cases.items()])
    result = build_sheet([sheet], [t.downloads], label="column:Subtype_mRNA", clinical=[by_sample],
                         clinical_id="pan.samplesID")
    assert result.sheet.drop_duplicates("patient_id").set_index("patient_id")["label"].to_dict() == got
    with pytest.raises(GdcError, match="no patient column"):
        build_sheet([sheet], [t.downloads], label="column:Subtype_mRNA", clinical=[by_sample])


# --- the TCGA reproduction configs -----------------------------------------------------------------

CONFIGS = {"tcga_nsclc": 2, "tcga_brca": 5}  # config -> number of classes of its label


def load_yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def leaf_keys(d: dict, prefix: str = "") -> set[str]:
    keys = set()
    for k, v in d.items():
        keys |= leaf_keys(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}"}
    return keys


@pytest.mark.parametrize("name", CONFIGS)
def test_config_has_every_key_of_config_yaml_and_validates(name: str) -> None:
    from snakemake.utils import validate

    config = load_yaml(REPO / "config" / f"{name}.yaml")
    assert leaf_keys(config) == leaf_keys(load_yaml(REPO / "config.yaml"))
    validate(config, str(REPO / "workflow" / "schemas" / "config.schema.yaml"))
    assert config["splits"]["n_folds"] == 5 and config["features"]["pretrained"] is True


@pytest.mark.parametrize("name", CONFIGS)
def test_config_runs_gimp_mgi_their_ablations_and_baselines_at_20x(name: str) -> None:
    from wsiomics.datasets import FoldData
    from wsiomics.encoders.presets import PRESETS
    from wsiomics.train.build import build_model
    from wsiomics.train.methods import get_method, method_config

    config = load_yaml(REPO / "config" / f"{name}.yaml")
    preset = PRESETS[config["features"]["encoder"]]
    assert preset.hub and preset.name != "resnet50_trunc"  # a pathology foundation model, not ImageNet
    assert config["tiling"]["target_mpp"] == 0.5  # 20x
    assert config["tiling"]["patch_size"] == preset.input_size  # the encoder sees 0.5 um/px, not coarser
    run = config["train"]["run"]
    assert {"gimp", "gimp_no_mpm", "gimp_no_triplet", "gimp_no_pretrain", "mgi", "mgi_transformer_genes",
            "mgi_mlp_genes", "mgi_no_pretrain", "linear", "gene_only", "image_only", "late_fusion", "cca"} <= set(run)
    assert all(get_method(m).task != "segment" for m in run)  # TCGA has no tumour annotations
    # every deep method's network builds with these settings at the cohort's shapes
    data = FoldData(fold=0, patients=[], classes=[f"c{i}" for i in range(CONFIGS[name])],
                    genes=[f"G{i}" for i in range(config["expression"]["n_top_genes"])], gene_groups=None,
                    feature_dim=preset.feature_dim)
    for m in run:
        method = get_method(m)
        if method.model.startswith("sklearn"):
            continue
        model = build_model(method, method_config(config["train"], m), data)
        assert sum(p.numel() for p in model.parameters()) > 0


def fake_tcga_tree(root: Path, projects: dict[str, list[str]]) -> tuple[GdcTree, list[Path]]:
    t = GdcTree(root)
    sheets = []
    for project, cases in projects.items():
        rows = [r for c in cases for r in (t.slide(c, project=project), t.rna(c, project=project))]
        sheets.append(t.sheet(f"gdc_sample_sheet.{project}.tsv", rows, "new"))
    return t, sheets


def dry_run(config: str, work: Path) -> str:
    cmd = [str(Path(sys.executable).parent / "snakemake"), "-s", str(REPO / "Snakefile"), "--cores", "2",
           "--configfile", str(REPO / "config" / f"{config}.yaml"), "--directory", str(work), "-n"]
    proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    return out


def job_counts(out: str) -> dict[str, int]:
    table = out.split("Job stats:")[1].split("total")[0].splitlines()[3:]
    return {line.split()[0]: int(line.split()[1]) for line in table if line.strip()}


@pytest.mark.integration
@pytest.mark.slow
def test_nsclc_config_dry_run_from_gdc_downloads(tmp_path: Path) -> None:
    """GDC tree -> importer -> snakemake -n with config/tcga_nsclc.yaml: every slide tiled and featurised with
    UNI, 5 folds of every method (the slides are fake: the DAG never opens them)."""
    luad = [f"TCGA-05-42{i:02d}" for i in range(5)]
    lusc = [f"TCGA-18-34{i:02d}" for i in range(5)]
    t, sheets = fake_tcga_tree(tmp_path, {"TCGA-LUAD": luad, "TCGA-LUSC": lusc})
    work = tmp_path / "work"
    assert main(["sheet", "--sample-sheet", *map(str, sheets), "--downloads", str(t.downloads),
                 "--out", str(work / "samples.tsv"), "--label", "project"]) == 0
    out = dry_run("tcga_nsclc", work)
    counts = job_counts(out)
    run = load_yaml(REPO / "config" / "tcga_nsclc.yaml")["train"]["run"]
    assert counts["tile"] == counts["place_features"] == 10 and counts["extract_features_batch"] == 1  # 16 a job
    assert counts["normalize_expression"] == 5 and counts["finetune"] == 5 * len(run)
    assert "results/features/uni/TCGA-05-4200-01Z-00-DX1.zarr" in out
    for m in run:
        assert f"results/models/{m}/fold4/metrics.json" in out
    labels = pd.read_csv(work / "results" / "sheet" / "patients.tsv", sep="\t")["label"]
    assert labels.value_counts().to_dict() == {"TCGA-LUAD": 5, "TCGA-LUSC": 5}


@pytest.mark.integration
@pytest.mark.slow
def test_brca_config_dry_run_with_a_clinical_label(tmp_path: Path) -> None:
    subtypes = ["BRCA_LumA", "BRCA_LumB", "BRCA_Her2", "BRCA_Basal", "BRCA_Normal"]
    cases = {f"TCGA-A2-A0{i:02d}": subtypes[i % 5] for i in range(10)}
    t, sheets = fake_tcga_tree(tmp_path, {"TCGA-BRCA": list(cases)})
    table = tmp_path / "data_clinical_patient.txt"
    table.write_text("#Patient Identifier\tSubtype\n#STRING\tSTRING\nPATIENT_ID\tSUBTYPE\n"
                     + "".join(f"{c}\t{s}\n" for c, s in cases.items()))
    work = tmp_path / "work"
    assert main(["sheet", "--sample-sheet", *map(str, sheets), "--downloads", str(t.downloads), "--out",
                 str(work / "samples.tsv"), "--label", "column:SUBTYPE", "--clinical", str(table)]) == 0
    out = dry_run("tcga_brca", work)
    run = load_yaml(REPO / "config" / "tcga_brca.yaml")["train"]["run"]
    assert job_counts(out)["finetune"] == 5 * len(run)
    labels = pd.read_csv(work / "results" / "sheet" / "patients.tsv", sep="\t")["label"]
    assert sorted(labels.unique()) == sorted(subtypes)


def test_imported_sheet_feeds_the_expression_stage(nsclc, tmp_path: Path) -> None:
    """The chosen STAR files are read by the expression stage, one row per patient with RNA."""
    from wsiomics.expression import CohortParams, build_cohort
    from wsiomics.gdc import write_result

    t, f, sheets = nsclc
    loaded = write_result(build_sheet(sheets, [t.downloads], label="project"), tmp_path / "w" / "samples.tsv")
    cohort = build_cohort(loaded, CohortParams())
    with_rna = sorted(loaded.loc[loaded["expression_path"] != "", "patient_id"].unique())
    assert sorted(cohort.obs_names) == with_rna == ["TCGA-05-4244", "TCGA-05-4249", "TCGA-21-1070", "TCGA-22-4593"]
    assert cohort.n_vars == 20


def test_non_tcga_ids_use_the_sheet_sample_types(tmp_path: Path) -> None:
    """Without TCGA barcodes (e.g. CPTAC), sample types come from the newer sheet's Tissue Type / Tumor Descriptor
    and the slide kind from its Preservation Method."""
    t = GdcTree(tmp_path)
    met = t.rna("C3L-00001", "06A", project="CPTAC-3")
    primary = t.rna("C3L-00001", "01A", project="CPTAC-3")
    normal = t.rna("C3L-00001", "11A", project="CPTAC-3")
    slide = t.slide("C3L-00001", project="CPTAC-3", name="C3L-00001-21.svs")
    frozen = t.slide("C3L-00001", section="TS1", project="CPTAC-3", name="C3L-00001-22.svs")
    for r, sample in ((met, "C3L-00001-06"), (primary, "C3L-00001-01"), (normal, "C3L-00001-11"),
                      (slide, "C3L-00001-21"), (frozen, "C3L-00001-22")):
        r["Sample ID"] = sample
    result = build_sheet([t.sheet("cptac.tsv", [met, primary, normal, slide, frozen], "new")], [t.downloads])
    assert result.sheet[["patient_id", "slide_id", "expression_path"]].values.tolist() == [
        ["C3L-00001", "C3L-00001-21", t.path(primary)]]
    why = reasons(result)
    assert why[met["File ID"]].startswith("another sample of the patient ranks first")
    assert why[normal["File ID"]].startswith("RNA of a normal sample (type 11)")
    assert why[frozen["File ID"]].startswith("slide kind frozen")
