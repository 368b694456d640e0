//! `--pprof FILE`: the outstanding memory as a gzipped pprof profile
//! (profile.proto), with `inuse_objects` and `inuse_space` samples and
//! locations, functions and mappings, for `go tool pprof`, Pyroscope, Parca.
//! The messages are declared here with prost's derive: no code generation.

use std::{collections::HashMap, io::Write as _};

use flate2::{Compression, write::GzEncoder};
use prost::Message as _;
use memleak_common::Kind;

use crate::symbolize::{Frame, MappingInfo, StackProfile};

/// The messages of profile.proto, with its field numbers.
pub mod proto {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Profile {
        #[prost(message, repeated, tag = "1")]
        pub sample_type: Vec<ValueType>,
        #[prost(message, repeated, tag = "2")]
        pub sample: Vec<Sample>,
        #[prost(message, repeated, tag = "3")]
        pub mapping: Vec<Mapping>,
        #[prost(message, repeated, tag = "4")]
        pub location: Vec<Location>,
        #[prost(message, repeated, tag = "5")]
        pub function: Vec<Function>,
        #[prost(string, repeated, tag = "6")]
        pub string_table: Vec<String>,
        #[prost(int64, tag = "7")]
        pub drop_frames: i64,
        #[prost(int64, tag = "8")]
        pub keep_frames: i64,
        #[prost(int64, tag = "9")]
        pub time_nanos: i64,
        #[prost(int64, tag = "10")]
        pub duration_nanos: i64,
        #[prost(message, optional, tag = "11")]
        pub period_type: Option<ValueType>,
        #[prost(int64, tag = "12")]
        pub period: i64,
        #[prost(int64, repeated, tag = "13")]
        pub comment: Vec<i64>,
        #[prost(int64, tag = "14")]
        pub default_sample_type: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ValueType {
        #[prost(int64, tag = "1")]
        pub r#type: i64,
        #[prost(int64, tag = "2")]
        pub unit: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Sample {
        /// Leaf first.
        #[prost(uint64, repeated, tag = "1")]
        pub location_id: Vec<u64>,
        #[prost(int64, repeated, tag = "2")]
        pub value: Vec<i64>,
        #[prost(message, repeated, tag = "3")]
        pub label: Vec<Label>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Label {
        #[prost(int64, tag = "1")]
        pub key: i64,
        #[prost(int64, tag = "2")]
        pub str: i64,
        #[prost(int64, tag = "3")]
        pub num: i64,
        #[prost(int64, tag = "4")]
        pub num_unit: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Mapping {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(uint64, tag = "2")]
        pub memory_start: u64,
        #[prost(uint64, tag = "3")]
        pub memory_limit: u64,
        #[prost(uint64, tag = "4")]
        pub file_offset: u64,
        #[prost(int64, tag = "5")]
        pub filename: i64,
        #[prost(int64, tag = "6")]
        pub build_id: i64,
        #[prost(bool, tag = "7")]
        pub has_functions: bool,
        #[prost(bool, tag = "8")]
        pub has_filenames: bool,
        #[prost(bool, tag = "9")]
        pub has_line_numbers: bool,
        #[prost(bool, tag = "10")]
        pub has_inline_frames: bool,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Location {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(uint64, tag = "2")]
        pub mapping_id: u64,
        #[prost(uint64, tag = "3")]
        pub address: u64,
        /// Inlined callees first, the function they were inlined into last.
        #[prost(message, repeated, tag = "4")]
        pub line: Vec<Line>,
        #[prost(bool, tag = "5")]
        pub is_folded: bool,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Line {
        #[prost(uint64, tag = "1")]
        pub function_id: u64,
        #[prost(int64, tag = "2")]
        pub line: i64,
        #[prost(int64, tag = "3")]
        pub column: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Function {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(int64, tag = "2")]
        pub name: i64,
        #[prost(int64, tag = "3")]
        pub system_name: i64,
        #[prost(int64, tag = "4")]
        pub filename: i64,
        #[prost(int64, tag = "5")]
        pub start_line: i64,
    }
}

/// About the whole profile.
#[derive(Debug, Clone, Copy)]
pub struct Meta {
    /// Wall-clock start of the trace, ns since the epoch.
    pub time_nanos: i64,
    pub duration_nanos: i64,
    /// One allocation in `period` was recorded (`-s`).
    pub period: i64,
}

/// Which values each sample carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Values {
    /// `inuse_objects`, `inuse_space`: what `--pprof` writes.
    Inuse,
    /// Go's heap profile, as `/debug/pprof/heap` and `/debug/pprof/allocs`
    /// serve it (Parca and Grafana Alloy scrape these unchanged):
    /// `alloc_objects`, `alloc_space` (since attach), `inuse_objects`,
    /// `inuse_space`; shown by default as `alloc_space` when
    /// `allocated_first`, else as `inuse_space`.
    Heap { allocated_first: bool },
}

/// Builds the profile. `mapping` tells which file mapping of process
/// `tgid` holds an address; `comm` its name, as a label of its samples.
pub fn build(
    stacks: &[StackProfile],
    values: Values,
    mapping: &mut dyn FnMut(u32, u64) -> Option<MappingInfo>,
    comm: &mut dyn FnMut(u32) -> Option<String>,
    meta: Meta,
) -> proto::Profile {
    let mut b = Builder::default();
    b.string(""); // string_table[0] is always ""
    let value_type = |b: &mut Builder, t: &str, u: &str| proto::ValueType { r#type: b.string(t), unit: b.string(u) };
    let mut sample_type = Vec::new();
    if let Values::Heap { .. } = values {
        sample_type.push(value_type(&mut b, "alloc_objects", "count"));
        sample_type.push(value_type(&mut b, "alloc_space", "bytes"));
    }
    sample_type.push(value_type(&mut b, "inuse_objects", "count"));
    sample_type.push(value_type(&mut b, "inuse_space", "bytes"));
    let period_type = Some(value_type(&mut b, "space", "bytes"));
    let (pid, comm_key, kind_key) = (b.string("pid"), b.string("comm"), b.string("kind"));
    let samples = stacks
        .iter()
        .filter(|s| s.bytes > 0 || s.count > 0 || (values != Values::Inuse && s.allocs > 0))
        .map(|s| {
            let mut label = vec![proto::Label { key: pid, num: s.tgid.into(), ..Default::default() }];
            if let Some(name) = comm(s.tgid) {
                label.push(proto::Label { key: comm_key, str: b.string(&name), ..Default::default() });
            }
            // The hooked function that made the blocks (`pprof -tagfocus kind=mmap`).
            if s.kind != Kind::Unknown {
                label.push(proto::Label { key: kind_key, str: b.string(s.kind.name()), ..Default::default() });
            }
            let mut value = Vec::with_capacity(4);
            if let Values::Heap { .. } = values {
                value.extend([s.allocs as i64, s.allocated as i64]);
            }
            value.extend([s.count as i64, s.bytes as i64]);
            proto::Sample {
                location_id: if s.frames.is_empty() {
                    vec![b.marker("[stack not recorded]")]
                } else {
                    s.frames.iter().map(|f| b.location(s.tgid, f, mapping)).collect()
                },
                value,
                label,
            }
        })
        .collect();
    let default_sample_type = match values {
        Values::Heap { allocated_first: true } => sample_type[1].r#type,
        _ => sample_type[sample_type.len() - 1].r#type,
    };
    proto::Profile {
        sample_type,
        sample: samples,
        mapping: b.mappings,
        location: b.locations,
        function: b.functions,
        string_table: b.strings,
        time_nanos: meta.time_nanos,
        duration_nanos: meta.duration_nanos,
        period_type,
        period: meta.period,
        default_sample_type,
        ..Default::default()
    }
}

/// The profile, encoded and gzipped as pprof files are.
pub fn encode_gzip(profile: &proto::Profile) -> std::io::Result<Vec<u8>> {
    let mut gz = GzEncoder::new(Vec::new(), Compression::default());
    gz.write_all(&profile.encode_to_vec())?;
    gz.finish()
}

/// Tables of a profile under construction; ids are 1-based indexes.
#[derive(Default)]
struct Builder {
    strings: Vec<String>,
    string_ids: HashMap<String, i64>,
    functions: Vec<proto::Function>,
    function_ids: HashMap<(String, Option<String>), u64>,
    locations: Vec<proto::Location>,
    location_ids: HashMap<(u32, u64), u64>,
    mappings: Vec<proto::Mapping>,
    mapping_ids: HashMap<(u32, u64), u64>,
    /// Locations that are no code: a name only.
    markers: HashMap<String, u64>,
}

impl Builder {
    fn string(&mut self, s: &str) -> i64 {
        if let Some(&i) = self.string_ids.get(s) {
            return i;
        }
        self.strings.push(s.to_string());
        let i = self.strings.len() as i64 - 1;
        self.string_ids.insert(s.to_string(), i);
        i
    }

    fn function(&mut self, name: &str, file: Option<&str>) -> u64 {
        let key = (name.to_string(), file.map(str::to_string));
        if let Some(&id) = self.function_ids.get(&key) {
            return id;
        }
        let id = self.functions.len() as u64 + 1;
        let name = self.string(name);
        let filename = file.map_or(0, |f| self.string(f));
        self.functions.push(proto::Function { id, name, system_name: name, filename, start_line: 0 });
        self.function_ids.insert(key, id);
        id
    }

    fn mapping(&mut self, tgid: u32, info: MappingInfo) -> u64 {
        if let Some(&id) = self.mapping_ids.get(&(tgid, info.start)) {
            return id;
        }
        let id = self.mappings.len() as u64 + 1;
        let build_id = info.build_id.map_or(0, |b| self.string(&hex(&b)));
        let filename = self.string(&info.path);
        self.mappings.push(proto::Mapping {
            id,
            memory_start: info.start,
            memory_limit: info.limit,
            file_offset: info.file_offset,
            filename,
            build_id,
            has_functions: true,
            has_filenames: true,
            has_line_numbers: true,
            has_inline_frames: true,
        });
        self.mapping_ids.insert((tgid, info.start), id);
        id
    }

    /// One location per (process, return address).
    fn location(&mut self, tgid: u32, frame: &Frame, mapping: &mut dyn FnMut(u32, u64) -> Option<MappingInfo>) -> u64 {
        if let Some(end) = frame.end_name() {
            return self.marker(&end);
        }
        if let Some(&id) = self.location_ids.get(&(tgid, frame.addr)) {
            return id;
        }
        let mapping_id = mapping(tgid, frame.addr).map_or(0, |m| self.mapping(tgid, m));
        let line = |b: &mut Self, name: &str, source: Option<&crate::symbolize::SourceLine>| proto::Line {
            function_id: b.function(name, source.map(|s| s.file.as_str())),
            line: source.and_then(|s| s.line).map_or(0, i64::from),
            column: 0,
        };
        let mut lines: Vec<proto::Line> =
            frame.inlined.iter().map(|(name, source)| line(self, name, source.as_ref())).collect();
        let name = match &frame.symbol {
            Some((name, _)) => name.clone(),
            None => format!("{:#x} [{}]", frame.addr, frame.module.as_deref().unwrap_or("unknown")),
        };
        lines.push(line(self, &name, frame.source.as_ref()));
        let id = self.locations.len() as u64 + 1;
        self.locations.push(proto::Location { id, mapping_id, address: frame.addr, line: lines, is_folded: false });
        self.location_ids.insert((tgid, frame.addr), id);
        id
    }

    /// A location that is no code, only a name: `[stack not recorded]` (the
    /// kernel could not record the stack), `[stack ends: why]`.
    fn marker(&mut self, name: &str) -> u64 {
        if let Some(&id) = self.markers.get(name) {
            return id;
        }
        let function_id = self.function(name, None);
        let id = self.locations.len() as u64 + 1;
        self.locations.push(proto::Location {
            id,
            line: vec![proto::Line { function_id, line: 0, column: 0 }],
            ..Default::default()
        });
        self.markers.insert(name.to_string(), id);
        id
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;

    use super::*;
    use crate::symbolize::SourceLine;

    fn frame(addr: u64, name: &str, line: u32) -> Frame {
        Frame {
            addr,
            symbol: Some((name.into(), 0x10)),
            module: Some("app".into()),
            source: Some(SourceLine { file: "src/app.c".into(), line: Some(line) }),
            inlined: vec![],
            end: None,
        }
    }

    fn app_mapping(_tgid: u32, addr: u64) -> Option<MappingInfo> {
        (0x1000..0x2000).contains(&addr).then(|| MappingInfo {
            start: 0x1000,
            limit: 0x2000,
            file_offset: 0x1000,
            path: "/srv/app".into(),
            build_id: Some(vec![0xde, 0xad, 0x01]),
        })
    }

    fn example() -> proto::Profile {
        let mut leaf = frame(0x1100, "fibonacci", 20);
        leaf.inlined = vec![("helper".into(), Some(SourceLine { file: "src/app.h".into(), line: Some(3) }))];
        let stacks = vec![
            StackProfile { tgid: 7, bytes: 81920, count: 10, frames: vec![leaf.clone(), frame(0x1200, "child", 32)], ..Default::default() },
            StackProfile { tgid: 7, bytes: 100, count: 1, frames: vec![frame(0x1300, "main", 40), frame(0x9000, "x", 1)], ..Default::default() },
            StackProfile { tgid: 7, bytes: 5, count: 1, frames: vec![], ..Default::default() },
        ];
        let meta = Meta { time_nanos: 1_700_000_000_000_000_000, duration_nanos: 3_000_000_000, period: 1 };
        build(&stacks, Values::Inuse, &mut app_mapping, &mut |_| None, meta)
    }

    #[test]
    fn samples_carry_inuse_objects_and_space_leaf_first() {
        let p = example();
        let s = |i: i64| p.string_table[i as usize].as_str();
        assert_eq!(s(0), "");
        let types: Vec<_> = p.sample_type.iter().map(|t| (s(t.r#type), s(t.unit))).collect();
        assert_eq!(types, [("inuse_objects", "count"), ("inuse_space", "bytes")]);
        assert_eq!(s(p.default_sample_type), "inuse_space");
        assert_eq!(p.sample.len(), 3);
        assert_eq!(p.sample[0].value, [10, 81920]);
        assert_eq!(p.sample[1].value, [1, 100]);
        assert_eq!((s(p.sample[0].label[0].key), p.sample[0].label[0].num), ("pid", 7));

        let loc = |id: u64| &p.location[id as usize - 1];
        let func = |id: u64| &p.function[id as usize - 1];
        let leaf = loc(p.sample[0].location_id[0]);
        assert_eq!(leaf.address, 0x1100);
        let names: Vec<_> = leaf.line.iter().map(|l| (s(func(l.function_id).name), l.line)).collect();
        assert_eq!(names, [("helper", 3), ("fibonacci", 20)], "inlined first, caller last");
        assert_eq!(s(func(leaf.line[1].function_id).filename), "src/app.c");
        let caller = loc(p.sample[0].location_id[1]);
        assert_eq!(s(func(caller.line[0].function_id).name), "child");

        let m = &p.mapping[leaf.mapping_id as usize - 1];
        assert_eq!((m.memory_start, m.memory_limit, m.file_offset), (0x1000, 0x2000, 0x1000));
        assert_eq!((s(m.filename), s(m.build_id)), ("/srv/app", "dead01"));
        assert_eq!(p.mapping.len(), 1, "one mapping shared by every location in it");
        let outside = loc(p.sample[1].location_id[1]);
        assert_eq!(outside.mapping_id, 0);

        let lost = loc(p.sample[2].location_id[0]);
        assert_eq!(s(func(lost.line[0].function_id).name), "[stack not recorded]");
    }

    #[test]
    fn ids_are_shared_and_one_based() {
        let p = example();
        for (i, l) in p.location.iter().enumerate() {
            assert_eq!(l.id, i as u64 + 1);
        }
        for (i, f) in p.function.iter().enumerate() {
            assert_eq!(f.id, i as u64 + 1);
        }
        let mut strings = p.string_table.clone();
        strings.sort();
        strings.dedup();
        assert_eq!(strings.len(), p.string_table.len(), "each string once");
    }

    #[test]
    fn gzip_round_trip() {
        let p = example();
        let gz = encode_gzip(&p).unwrap();
        assert_eq!(&gz[..2], &[0x1f, 0x8b]);
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(&gz[..]).read_to_end(&mut raw).unwrap();
        assert_eq!(proto::Profile::decode(&raw[..]).unwrap(), p);
    }
}
