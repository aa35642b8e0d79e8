//! splitee's recorded format (see the [module docs](super)): writing it and reading it back.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::Path;

use splitee_link::{HeaderCsv, InputError};

use super::{ConfidenceMatrix, SampleRow, parse_class, parse_unit, read_text};

impl ConfidenceMatrix {
    /// Writes splitee's recorded format (see the module docs). Probabilities are written in
    /// the shortest form that reads back to the same `f32`, timings to the same `f64`.
    pub fn write_csv(&self, path: &Path) -> anyhow::Result<()> {
        let mut file = std::io::BufWriter::new(fs::File::create(path)?);
        self.write_csv_to(&mut file)?;
        file.flush()?;
        Ok(())
    }

    pub fn write_csv_to<W: Write>(&self, out: &mut W) -> anyhow::Result<()> {
        let classes = self
            .num_classes
            .ok_or_else(|| anyhow::anyhow!("a predictions-only matrix has no probabilities"))?;
        if !self.metadata.is_empty() {
            let words: Vec<String> = self
                .metadata
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            writeln!(out, "# {}", words.join(" "))?;
        }
        let mut csv = csv::Writer::from_writer(out);
        let mut header = vec!["id".to_owned(), "label".to_owned(), "tokens".to_owned()];
        for l in &self.exit_layers {
            header.extend((0..classes).map(|c| format!("exit{l}_p{c}")));
        }
        if self.has_layer_ms {
            header.extend((1..=self.num_layers).map(|j| format!("layer{j}_ms")));
        }
        csv.write_record(&header)?;
        let mut record: Vec<String> = Vec::with_capacity(header.len());
        for i in 0..self.len() {
            record.clear();
            record.push(self.ids[i].clone());
            record.push(self.labels[i].map(|l| l.to_string()).unwrap_or_default());
            record.push(self.tokens[i].map(|t| t.to_string()).unwrap_or_default());
            record.extend(self.probs(i).unwrap_or(&[]).iter().map(|p| p.to_string()));
            record.extend(
                self.layer_ms(i)
                    .unwrap_or(&[])
                    .iter()
                    .map(|m| m.to_string()),
            );
            csv.write_record(&record)?;
        }
        csv.flush()?;
        Ok(())
    }

    /// Reads splitee's recorded format (see the module docs).
    pub fn read_csv(path: &Path) -> Result<Self, InputError> {
        let text = read_text(path)?;
        let mut metadata = BTreeMap::new();
        for line in text.lines().take_while(|l| l.trim_start().starts_with('#')) {
            for word in line.trim_start().trim_start_matches('#').split_whitespace() {
                if let Some((k, v)) = word.split_once('=')
                    && !k.is_empty()
                {
                    metadata.insert(k.to_owned(), v.to_owned());
                }
            }
        }
        let mut csv = HeaderCsv::from_text(path, &text, true)?;
        let header = csv.header().iter().map(str::to_owned).collect::<Vec<_>>();
        let header_line = csv.header_line();
        let layout = Layout::parse(&header).map_err(|m| InputError::at(path, header_line, m))?;
        if let Some(layers) = metadata.get("layers") {
            match layers.parse::<usize>() {
                Ok(l) if l == layout.num_layers => {}
                _ => {
                    return Err(InputError::new(
                        path,
                        format!(
                            "metadata says layers={layers}, the columns describe {} layers",
                            layout.num_layers
                        ),
                    ));
                }
            }
        }
        let mut matrix = ConfidenceMatrix::new(
            layout.num_layers,
            layout.exit_layers.clone(),
            layout.num_classes,
            layout.has_layer_ms,
        )
        .map_err(|m| InputError::at(path, header_line, m))?;
        matrix.metadata = metadata;
        let mut probs = Vec::with_capacity(layout.exit_layers.len() * layout.num_classes);
        let mut layer_ms = Vec::with_capacity(layout.num_layers);
        for row in csv.rows() {
            let (line, record) = row?;
            let field_error = |col: usize, m: String| {
                InputError::at(path, line, m).in_column(header[col].clone())
            };
            if record.len() != header.len() {
                return Err(InputError::at(
                    path,
                    line,
                    format!("{} fields, the header has {}", record.len(), header.len()),
                ));
            }
            let id = &record[0];
            let label = if record[1].is_empty() {
                None
            } else {
                Some(parse_class(&record[1]).map_err(|m| field_error(1, m))?)
            };
            let tokens = parse_class(&record[2]).map_err(|m| field_error(2, m))?;
            probs.clear();
            for col in 3..3 + layout.exit_layers.len() * layout.num_classes {
                let p = parse_unit(&record[col]).map_err(|m| field_error(col, m))?;
                probs.push(p as f32);
            }
            layer_ms.clear();
            for col in 3 + probs.len()..header.len() {
                let v: f64 = record[col]
                    .parse()
                    .map_err(|_| field_error(col, format!("`{}` is not a number", &record[col])))?;
                if !(v.is_finite() && v >= 0.0) {
                    return Err(field_error(col, format!("time {v} ms is not ≥ 0")));
                }
                layer_ms.push(v);
            }
            matrix
                .push(SampleRow {
                    id,
                    label,
                    tokens,
                    probs: &probs,
                    layer_ms: &layer_ms,
                })
                .map_err(|m| InputError::at(path, line, m))?;
        }
        if matrix.is_empty() {
            return Err(InputError::new(path, "no samples"));
        }
        Ok(matrix)
    }
}

/// Column layout of a splitee header.
struct Layout {
    exit_layers: Vec<usize>,
    num_classes: usize,
    num_layers: usize,
    has_layer_ms: bool,
}

impl Layout {
    fn parse(header: &[String]) -> Result<Layout, String> {
        if header.len() < 3 || header[0] != "id" || header[1] != "label" || header[2] != "tokens" {
            return Err("header must start with `id,label,tokens`".into());
        }
        let mut exits: Vec<(usize, Vec<usize>)> = Vec::new();
        let mut col = 3;
        while col < header.len() {
            let Some((l, c)) = parse_exit_column(&header[col]) else {
                break;
            };
            match exits.last_mut() {
                Some((last, classes)) if *last == l => classes.push(c),
                Some((last, _)) if *last > l => {
                    return Err(format!(
                        "column `{}`: exits must ascend (after exit {last})",
                        header[col]
                    ));
                }
                _ => exits.push((l, vec![c])),
            }
            col += 1;
        }
        if exits.is_empty() {
            return Err("no `exit{l}_p{c}` columns after `tokens`".into());
        }
        let num_classes = exits[0].1.len();
        for (l, classes) in &exits {
            if *l == 0 {
                return Err("exit layers are 1-based: `exit0_…`".into());
            }
            if *classes != (0..num_classes).collect::<Vec<_>>() {
                return Err(format!(
                    "exit {l}: class columns must be p0..p{} in order, like the first exit",
                    num_classes - 1
                ));
            }
        }
        let mut num_timings = 0;
        while col < header.len() {
            let want = format!("layer{}_ms", num_timings + 1);
            if header[col] != want {
                return Err(format!("column `{}`: expected `{want}`", header[col]));
            }
            num_timings += 1;
            col += 1;
        }
        let exit_layers: Vec<usize> = exits.iter().map(|(l, _)| *l).collect();
        let last_exit = *exit_layers.last().expect("non-empty");
        let num_layers = if num_timings > 0 {
            num_timings
        } else {
            last_exit
        };
        Ok(Layout {
            exit_layers,
            num_classes,
            num_layers,
            has_layer_ms: num_timings > 0,
        })
    }
}

fn parse_exit_column(name: &str) -> Option<(usize, usize)> {
    let rest = name.strip_prefix("exit")?;
    let (l, c) = rest.split_once("_p")?;
    Some((l.parse().ok()?, c.parse().ok()?))
}
