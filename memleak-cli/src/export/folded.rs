//! `--folded FILE`: collapsed stacks, `root;...;leaf bytes`, one line per
//! distinct stack, the input of flamegraph.pl, inferno and speedscope.

use std::collections::BTreeMap;

use memleak_common::Kind;

use crate::symbolize::{Frame, StackProfile};

/// The folded lines of `stacks`, sorted; stacks that fold to the same
/// names (the same functions, called from other offsets) are summed. The
/// hooked function that made the blocks is the leaf frame (`main;f;malloc`),
/// as allocation profilers put what was allocated: folded lines have no
/// labels.
pub fn lines(stacks: &[StackProfile]) -> Vec<String> {
    let mut bytes: BTreeMap<String, u64> = BTreeMap::new();
    for stack in stacks.iter().filter(|s| s.bytes > 0) {
        let mut names = names(&stack.frames);
        if stack.kind != Kind::Unknown {
            names.push(stack.kind.name().to_string());
        }
        *bytes.entry(names.join(";")).or_default() += stack.bytes;
    }
    bytes.into_iter().map(|(names, bytes)| format!("{names} {bytes}")).collect()
}

/// Frame names, outermost first; inlined functions are frames of their own.
/// A frame without a symbol is `[module]`; a stack the kernel could not
/// record is `[stack not recorded]`, one cut where it really ends starts
/// with `[stack ends: why]`.
pub fn names(frames: &[Frame]) -> Vec<String> {
    if frames.is_empty() {
        return vec!["[stack not recorded]".into()];
    }
    let mut names: Vec<String> = Vec::new();
    for frame in frames.iter().rev() {
        let own = match (&frame.symbol, frame.end_name()) {
            (_, Some(end)) => end,
            (Some((name, _)), _) => name.clone(),
            (None, _) => format!("[{}]", frame.module.as_deref().unwrap_or("unknown")),
        };
        names.push(own);
        // Inlined callees are innermost first: the outermost comes next.
        names.extend(frame.inlined.iter().rev().map(|(name, _)| name.clone()));
    }
    // ';' separates frames; a line ends at its last whitespace.
    names.iter().map(|n| n.replace(';', ":").replace(['\n', '\r'], " ")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(addr: u64, name: Option<&str>) -> Frame {
        Frame {
            addr,
            symbol: name.map(|n| (n.to_string(), 0x10)),
            module: Some("libc.so.6".into()),
            source: None,
            inlined: vec![],
            end: None,
        }
    }

    fn stack(bytes: u64, frames: Vec<Frame>) -> StackProfile {
        StackProfile { tgid: 1, bytes, count: 1, frames, ..Default::default() }
    }

    #[test]
    fn root_first_leaf_last_with_bytes() {
        let frames = vec![frame(1, Some("fibonacci")), frame(2, Some("child")), frame(3, None)];
        assert_eq!(lines(&[stack(81920, frames)]), ["[libc.so.6];child;fibonacci 81920"]);
    }

    #[test]
    fn inlined_callees_sit_between_caller_and_callee() {
        let mut leaf = frame(1, Some("outer"));
        // innermost first: c inlined into b, b into outer.
        leaf.inlined = vec![("c".into(), None), ("b".into(), None)];
        assert_eq!(names(&[leaf, frame(2, Some("main"))]), ["main", "outer", "b", "c"]);
    }

    #[test]
    fn same_names_merge_and_lines_sort() {
        let a = stack(10, vec![frame(1, Some("f")), frame(2, Some("main"))]);
        let b = stack(5, vec![frame(7, Some("f")), frame(8, Some("main"))]);
        let c = stack(1, vec![]);
        let zero = stack(0, vec![frame(9, Some("z"))]);
        assert_eq!(lines(&[a, c, b, zero]), ["[stack not recorded] 1", "main;f 15"]);
    }

    #[test]
    fn separators_inside_names_are_escaped() {
        assert_eq!(names(&[frame(1, Some("odd;name\n"))]), ["odd:name "]);
    }
}
