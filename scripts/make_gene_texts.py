"""Build the compact gene-description table shipped with imagene (``datasets/_data/gene_texts.tsv.gz``).

Source: a human gene table (``symbol entrez_id ensembl_ids gene_type name aliases go_biological_process
go_molecular_function go_cellular_component``) exported from the Bioconductor annotation packages
``org.Hs.eg.db`` (NCBI Gene 2022-09, Artistic-2.0) and ``GO.db`` (Gene Ontology, CC BY 4.0).
Each gene becomes one short text, ``"<SYMBOL>: <name>. Aliases: ... . GO: ..."``, with at most
``MAX_ALIASES`` aliases and ``MAX_GO`` GO terms (biological process first, then molecular function,
then cellular component; the GO root terms are dropped) so the shipped file stays small.

Usage::

    python scripts/make_gene_texts.py [path/to/human_genes.tsv.gz]
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT.parent / "shared" / "data" / "genes" / "human_genes.tsv.gz"
TARGET = ROOT / "src" / "imagene" / "datasets" / "_data" / "gene_texts.tsv.gz"
MAX_ALIASES = 4
MAX_GO = 6
_ROOTS = {"biological_process", "molecular_function", "cellular_component"}


def _terms(value: object) -> list[str]:
    if not isinstance(value, str) or not value:
        return []
    return [t.strip() for t in value.split(";") if t.strip() and t.strip() not in _ROOTS]


def gene_text(row: pd.Series) -> str:
    """One gene's description from a row of the source table."""
    parts = [f"{row['symbol']}: {row['name']}." if isinstance(row["name"], str) and row["name"] else f"{row['symbol']}."]
    aliases = [a for a in str(row["aliases"]).split(",") if a and a != "nan"][:MAX_ALIASES]
    if aliases:
        parts.append("Aliases: " + ", ".join(aliases) + ".")
    go: list[str] = []
    for col in ("go_biological_process", "go_molecular_function", "go_cellular_component"):
        go += [t for t in _terms(row[col]) if t not in go]
    if go:
        parts.append("GO: " + "; ".join(go[:MAX_GO]) + ".")
    return " ".join(parts)


def main(source: str | Path = SOURCE) -> None:
    """Write the table (columns ``symbol``, ``aliases``, ``text``)."""
    df = pd.read_csv(source, sep="\t", dtype=str, keep_default_na=False)
    df = df[df["symbol"].str.len() > 0].drop_duplicates("symbol")
    out = pd.DataFrame(
        {
            "symbol": df["symbol"].to_numpy(),
            "aliases": df["aliases"].str.split(",").str[:MAX_ALIASES].str.join(",").fillna("").to_numpy(),
            "text": df.apply(gene_text, axis=1).to_numpy(),
        }
    )
    TARGET.parent.mkdir(parents=True, exist_ok=True)
    out.to_csv(TARGET, sep="\t", index=False, compression={"method": "gzip", "compresslevel": 9, "mtime": 0})
    sys.stderr.write(f"wrote {len(out)} genes to {TARGET} ({TARGET.stat().st_size / 1e6:.2f} MB)\n")


if __name__ == "__main__":
    main(*sys.argv[1:2])
