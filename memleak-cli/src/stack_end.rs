//! Where a user stack really ends.
//!
//! A frame-pointer walk through code built without frame pointers reads
//! whatever %rbp holds as a frame record, and what it finds there as return
//! addresses: heap pointers (`0x55c5180ec9c0 [[heap]]`), small numbers
//! (`0x300000002 [unmapped]`). The walk cannot tell; here, with the
//! process's mappings and code at hand, it is cheap to: a return address
//! lies in executable memory, right after a call instruction. The first
//! address that does not ends the stack, with a reason, and what follows
//! is dropped: so two stacks that differ only in what the walk made up
//! are one stack. The rule takes any walk's addresses (the frame-pointer
//! walk of the kernel side, or a table unwinder's frame-pointer fallback).

use std::fmt;

use iced_x86::{Decoder, DecoderOptions, FlowControl};

use crate::target::proc::Mapping;

/// The longest x86-64 instruction: the most bytes before a return address
/// a call can take.
pub const CALL_WINDOW: usize = 15;

/// Why an address cannot be a return address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// In no mapping of the process.
    Unmapped,
    /// In a mapping that is not executable: `heap`, `stack`, `anonymous
    /// memory`, or the data of a file (`libc.so.6`).
    NotCode(String),
    /// In the code of this module, but not right after a call.
    NoCall(String),
}

impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            End::Unmapped => f.write_str("next address unmapped"),
            End::NotCode(region) => write!(f, "next address in {region}, not code"),
            End::NoCall(module) => write!(f, "next address in {module} follows no call"),
        }
    }
}

/// The name of a mapping in a reason: its file's name, or what /proc calls
/// the region, without brackets (`[heap]` reads as a frame's module).
fn region(m: &Mapping) -> String {
    match m.path.as_str() {
        "" => "anonymous memory".to_string(),
        p if p.starts_with('[') => p.trim_start_matches('[').trim_end_matches(']').to_string(),
        _ => m.module_name().to_string(),
    }
}

/// Whether `ret` can be a return address; `mapping`: the process's mapping
/// that holds `ret - 1` (the call before a return address: a call ending a
/// mapping returns to the first byte past it), if any.
/// `code_before(mapping, ret, buf)` fills the end of `buf` with the bytes
/// just before `ret` and returns how many it read (fewer near the start of
/// a mapping; 0 if it cannot read them: then only the mapping is checked).
pub fn check(
    ret: u64,
    mapping: Option<&Mapping>,
    code_before: impl FnOnce(&Mapping, u64, &mut [u8; CALL_WINDOW]) -> usize,
) -> Result<(), End> {
    let Some(m) = mapping else { return Err(End::Unmapped) };
    if !m.perms.contains('x') {
        return Err(End::NotCode(region(m)));
    }
    let mut buf = [0u8; CALL_WINDOW];
    let read = code_before(m, ret, &mut buf).min(CALL_WINDOW);
    if read == 0 || ends_with_call(&buf[CALL_WINDOW - read..], ret) {
        Ok(())
    } else {
        Err(End::NoCall(region(m)))
    }
}

/// Whether `code`, the bytes just before `ret`, ends with a call
/// instruction (any form: `call rel32`, `call *%rax`, `call *0x8(%rbx)`,
/// with prefixes). Each start a call could have is decoded: the bytes
/// before a call are no guide to where instructions begin.
pub fn ends_with_call(code: &[u8], ret: u64) -> bool {
    if !cfg!(target_arch = "x86_64") {
        return true; // no decoder for this architecture: the mapping check only
    }
    // The shortest call is two bytes (`call *%rax`).
    (2..=code.len()).any(|len| {
        let start = code.len() - len;
        let mut decoder = Decoder::with_ip(64, &code[start..], ret - len as u64, DecoderOptions::NONE);
        let insn = decoder.decode();
        !insn.is_invalid()
            && insn.len() == len
            && matches!(insn.flow_control(), FlowControl::Call | FlowControl::IndirectCall)
    })
}

/// How much of `addrs` (return addresses, innermost first) is kept: up to
/// the first that `check` refuses, which is why the stack ends there.
pub fn kept(addrs: &[u64], mut check: impl FnMut(u64) -> Result<(), End>) -> (usize, Option<End>) {
    for (i, &addr) in addrs.iter().enumerate() {
        if let Err(end) = check(addr) {
            return (i, Some(end));
        }
    }
    (addrs.len(), None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapping(start: u64, end: u64, perms: &str, path: &str) -> Mapping {
        Mapping {
            start,
            end,
            perms: perms.into(),
            offset: 0,
            dev: "08:01".into(),
            inode: if path.starts_with('/') { 7 } else { 0 },
            path: path.into(),
        }
    }

    /// `bytes` right before the return address.
    fn after(bytes: &[u8]) -> bool {
        let mut code = vec![0x90; CALL_WINDOW - bytes.len()]; // nops before
        code.extend_from_slice(bytes);
        ends_with_call(&code, 0x1000)
    }

    #[test]
    fn every_call_form_is_a_call() {
        assert!(after(&[0xe8, 0x10, 0x20, 0x00, 0x00])); // call rel32
        assert!(after(&[0xff, 0xd0])); // call *%rax
        assert!(after(&[0x41, 0xff, 0xd3])); // call *%r11
        assert!(after(&[0xff, 0x15, 0x10, 0x20, 0x00, 0x00])); // call *0x2010(%rip)
        assert!(after(&[0xff, 0x53, 0x08])); // call *0x8(%rbx)
        assert!(after(&[0xff, 0x14, 0xc5, 0x00, 0x10, 0x00, 0x00])); // call *0x1000(,%rax,8)
        assert!(after(&[0x3e, 0xff, 0xd0])); // notrack call *%rax
    }

    #[test]
    fn other_code_is_no_call() {
        assert!(!after(&[0x48, 0x89, 0xc7])); // mov %rax,%rdi
        assert!(!after(&[0xff, 0xe0])); // jmp *%rax
        assert!(!after(&[0xe9, 0x10, 0x20, 0x00, 0x00])); // jmp rel32
        assert!(!after(&[0xc3])); // ret
        assert!(!after(&[])); // nops only
    }

    fn at(maps: &[Mapping], ret: u64, code: impl FnOnce(&Mapping, u64, &mut [u8; CALL_WINDOW]) -> usize) -> Result<(), End> {
        check(ret, maps.iter().find(|m| m.contains(ret - 1)), code)
    }

    #[test]
    fn a_return_address_is_in_code_after_a_call() {
        let maps = [
            mapping(0x1000, 0x2000, "r-xp", "/usr/bin/app"),
            mapping(0x2000, 0x3000, "rw-p", "/usr/bin/app"),
            mapping(0x5000, 0x6000, "rw-p", "[heap]"),
            mapping(0x7000, 0x8000, "rw-p", ""),
        ];
        let call = |_: &Mapping, _: u64, buf: &mut [u8; CALL_WINDOW]| {
            buf[CALL_WINDOW - 5..].copy_from_slice(&[0xe8, 0, 0, 0, 0]);
            CALL_WINDOW
        };
        let mov = |_: &Mapping, _: u64, buf: &mut [u8; CALL_WINDOW]| {
            buf[CALL_WINDOW - 3..].copy_from_slice(&[0x48, 0x89, 0xc7]);
            CALL_WINDOW
        };
        assert_eq!(at(&maps, 0x1800, call), Ok(()));
        // A call that is the last instruction of the mapping.
        assert_eq!(at(&maps, 0x2000, call), Ok(()));
        assert_eq!(at(&maps, 0x1800, mov), Err(End::NoCall("app".into())));
        // Code it cannot read: the mapping decides alone.
        assert_eq!(at(&maps, 0x1800, |_, _, _| 0), Ok(()));
        assert_eq!(at(&maps, 0x2800, call), Err(End::NotCode("app".into())));
        assert_eq!(at(&maps, 0x5800, call), Err(End::NotCode("heap".into())));
        assert_eq!(at(&maps, 0x7800, call), Err(End::NotCode("anonymous memory".into())));
        assert_eq!(at(&maps, 0x3_0000_0002, call), Err(End::Unmapped));
        assert_eq!(End::NotCode("heap".into()).to_string(), "next address in heap, not code");
    }

    #[test]
    fn a_stack_keeps_what_comes_before_the_first_refused_address() {
        let ok_below = |limit| move |a: u64| if a < limit { Ok(()) } else { Err(End::Unmapped) };
        assert_eq!(kept(&[1, 2, 3], ok_below(10)), (3, None));
        assert_eq!(kept(&[1, 20, 3], ok_below(10)), (1, Some(End::Unmapped)));
        assert_eq!(kept(&[20, 1], ok_below(10)), (0, Some(End::Unmapped)));
        assert_eq!(kept(&[], ok_below(10)), (0, None));
    }
}
