//! Where an entry probe goes inside a function.
//!
//! A uprobe costs a trap either way, but what follows differs a lot: the
//! kernel emulates a few instructions (push of a register, relative
//! jmp/call/jcc, a one-byte nop) and single-steps every other one out of
//! line, which takes a second trap and costs several times more. glibc
//! 2.36's `free` starts with `test %rdi,%rdi; je ...`: a probe at its entry
//! is single-stepped on every call (~4 µs against ~0.6 µs). So for probes
//! that do not need the entry (no return probe there) and a prologue we
//! know, the probe goes on the first emulated instruction after it, where
//! the argument registers still hold what the caller passed.
//!
//! Only one pattern is moved, and only when every check passes; anything
//! else keeps the entry:
//!
//! ```text
//! [endbr64]            landing pad, no register written
//! test %rdi,%rdi       flags only
//! je   <elsewhere>     taken only for a NULL first argument, which the probe ignores
//! push %reg | nop      emulated: the probe goes here, rdi intact
//! ```
//!
//! and no direct branch in the function may land between the entry and the
//! new place (the probe would fire twice for one call).

use iced_x86::{Code, Decoder, DecoderOptions, FlowControl, Instruction, Register};

/// How far past the function's start its entry probe goes, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// Bytes from the function's first instruction.
    pub delta: u64,
    pub why: &'static str,
}

impl Placement {
    const fn entry(why: &'static str) -> Self {
        Self { delta: 0, why }
    }
}

/// Where to put the entry probe of a function whose machine code (x86-64)
/// is `code`, the whole function. `null_arg0_ignored`: the probe does
/// nothing when the first argument is NULL (free), so a path taken only
/// for a NULL first argument may bypass it.
pub fn entry_probe(code: &[u8], null_arg0_ignored: bool) -> Placement {
    if !cfg!(target_arch = "x86_64") {
        return Placement::entry("entry (not x86-64)");
    }
    let insns = decode_prefix(code, 4);
    let Some(first) = insns.first() else {
        return Placement::entry("entry (cannot decode)");
    };
    if is_emulated(first) {
        return Placement::entry("entry (emulated)");
    }
    if !null_arg0_ignored {
        return Placement::entry("entry (single-stepped; no safe pattern for this probe)");
    }
    let mut at = 0;
    if insns[at].code() == Code::Endbr64 {
        at += 1;
    }
    let (Some(test), Some(je), Some(target)) = (insns.get(at), insns.get(at + 1), insns.get(at + 2)) else {
        return Placement::entry("entry (single-stepped; prologue too short)");
    };
    let tests_rdi = test.code() == Code::Test_rm64_r64
        && test.op0_register() == Register::RDI
        && test.op1_register() == Register::RDI;
    let je_away = matches!(je.code(), Code::Je_rel8_64 | Code::Je_rel32_64);
    if !(tests_rdi && je_away && is_emulated(target)) {
        return Placement::entry("entry (single-stepped; prologue not test %rdi,%rdi; je; push)");
    }
    let delta = target.ip();
    if je.near_branch_target() <= delta {
        return Placement::entry("entry (single-stepped; the NULL branch does not leave the prologue)");
    }
    if let Some(why) = branch_into(code, delta) {
        return Placement::entry(why);
    }
    Placement { delta, why: "past test %rdi,%rdi; je (free(NULL) is ignored): emulated push" }
}

/// The first `n` instructions, with `ip` relative to the function's start.
fn decode_prefix(code: &[u8], n: usize) -> Vec<Instruction> {
    let mut decoder = Decoder::with_ip(64, code, 0, DecoderOptions::NONE);
    let mut out = Vec::with_capacity(n);
    while out.len() < n && decoder.can_decode() {
        let insn = decoder.decode();
        if insn.is_invalid() {
            break;
        }
        out.push(insn);
    }
    out
}

/// Instructions the kernel's x86 uprobes emulate instead of single-stepping
/// (arch/x86/kernel/uprobes.c: push_setup_xol_ops, branch_setup_xol_ops):
/// push of a 64-bit register (no prefix but REX.B), relative jmp/call/jcc,
/// and the one-byte nop.
pub fn is_emulated(insn: &Instruction) -> bool {
    match insn.code() {
        Code::Push_r64 => insn.len() <= 2,
        Code::Nopd => insn.len() == 1,
        _ => insn.is_jmp_short_or_near() || insn.is_call_near() || insn.is_jcc_short_or_near(),
    }
}

/// Why the entry must stay, if a direct branch anywhere in `code` may land
/// in `1..=delta`: one does, or an instruction cannot be decoded (memleak's
/// decoder knows no VEX, EVEX, XOP or 3DNow!, see Cargo.toml), past which
/// the decoding could be out of step and miss a branch.
fn branch_into(code: &[u8], delta: u64) -> Option<&'static str> {
    let mut decoder = Decoder::with_ip(64, code, 0, DecoderOptions::NONE);
    let mut insn = Instruction::default();
    while decoder.can_decode() {
        decoder.decode_out(&mut insn);
        if insn.is_invalid() {
            return Some("entry (single-stepped; an instruction not decoded: a branch into the prologue may be missed)");
        }
        let direct = matches!(
            insn.flow_control(),
            FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch | FlowControl::Call | FlowControl::XbeginXabortXend
        );
        if direct {
            let target = insn.near_branch_target();
            if (1..=delta).contains(&target) {
                return Some("entry (single-stepped; a branch lands inside the prologue)");
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const FREE_2_36: &[u8] = &[
        0x48, 0x85, 0xff, // test %rdi,%rdi
        0x0f, 0x84, 0xbf, 0x00, 0x00, 0x00, // je +0xbf
        0x55, // push %rbp
        0x48, 0x8d, 0x77, 0xf0, // lea -0x10(%rdi),%rsi
        0x53, // push %rbx
    ];

    #[test]
    fn glibc_free_prologue_moves_to_the_push() {
        assert_eq!(entry_probe(FREE_2_36, true).delta, 9);
    }

    #[test]
    fn only_for_probes_that_ignore_null() {
        assert_eq!(entry_probe(FREE_2_36, false).delta, 0);
    }

    #[test]
    fn short_je_and_endbr64() {
        // endbr64; test %rdi,%rdi; je +0x10; push %r12
        let code = [0xf3, 0x0f, 0x1e, 0xfa, 0x48, 0x85, 0xff, 0x74, 0x10, 0x41, 0x54, 0x90];
        assert_eq!(entry_probe(&code, true).delta, 9);
    }

    #[test]
    fn emulated_entry_stays() {
        // push %r12; push %rbp (malloc)
        let p = entry_probe(&[0x41, 0x54, 0x55], true);
        assert_eq!(p.delta, 0);
        assert!(p.why.contains("emulated"), "{p:?}");
    }

    #[test]
    fn other_prologues_stay_at_the_entry() {
        // test %rsi,%rsi; je; push: not the first argument
        assert_eq!(entry_probe(&[0x48, 0x85, 0xf6, 0x74, 0x10, 0x55], true).delta, 0);
        // test %rdi,%rdi; jne: the probe would be skipped for non-NULL
        assert_eq!(entry_probe(&[0x48, 0x85, 0xff, 0x75, 0x10, 0x55], true).delta, 0);
        // test %rdi,%rdi; je; mov %rdi,%rax: not emulated, nothing gained
        assert_eq!(entry_probe(&[0x48, 0x85, 0xff, 0x74, 0x10, 0x48, 0x89, 0xf8], true).delta, 0);
        // test %edi,%edi (32-bit): not a pointer test
        assert_eq!(entry_probe(&[0x85, 0xff, 0x74, 0x10, 0x55], true).delta, 0);
        // mov $0xb,%eax; syscall (munmap)
        assert_eq!(entry_probe(&[0xb8, 0x0b, 0, 0, 0, 0x0f, 0x05], true).delta, 0);
        // garbage and empty
        assert_eq!(entry_probe(&[0x0f, 0x0b], true).delta, 0);
        assert_eq!(entry_probe(&[], true).delta, 0);
    }

    #[test]
    fn a_branch_back_into_the_prologue_keeps_the_entry() {
        // test; je +3; push %rbp; nop; nop; jmp back to the push (-4 from 0x0b)
        let code = [0x48, 0x85, 0xff, 0x74, 0x08, 0x55, 0x90, 0x90, 0x90, 0xeb, 0xfa, 0xc3, 0xc3, 0xc3];
        assert_eq!(decode_prefix(&code, 8)[6].near_branch_target(), 5);
        assert_eq!(entry_probe(&code, true).delta, 0);
        // The NULL branch must leave the prologue, not land on the push.
        assert_eq!(entry_probe(&[0x48, 0x85, 0xff, 0x74, 0x00, 0x55], true).delta, 0);
    }

    #[test]
    fn an_instruction_it_cannot_decode_keeps_the_entry() {
        // test; je; push %rbp; vmovdqu (%rdi),%xmm0 (VEX); ret: what
        // follows an instruction the decoder does not know may be read
        // out of step, and a branch into the prologue missed.
        let code = [0x48, 0x85, 0xff, 0x74, 0x10, 0x55, 0xc5, 0xfa, 0x6f, 0x07, 0xc3];
        let p = entry_probe(&code, true);
        assert_eq!(p.delta, 0, "{p:?}");
        assert!(p.why.contains("not decoded"), "{p:?}");
        // The same without it moves.
        assert_eq!(entry_probe(&[0x48, 0x85, 0xff, 0x74, 0x10, 0x55, 0x90, 0xc3], true).delta, 5);
    }

    /// The real libc of this machine: whatever its prologues are, a moved
    /// probe sits on an emulated instruction reached with rdi untouched.
    #[test]
    fn real_libc_placements_are_safe() {
        let libc = crate::target::elf::tests::own_libc();
        let names = ["malloc", "free", "calloc", "realloc", "munmap", "mmap"];
        let functions = crate::target::elf::functions(&libc, &names).unwrap();
        for name in names {
            let Some(f) = functions.get(name) else { continue };
            let p = entry_probe(&f.code, name == "free");
            if name != "free" {
                assert_eq!(p.delta, 0, "{name}: {p:?}");
                continue;
            }
            if p.delta == 0 {
                continue; // another prologue: the entry is always right
            }
            let insns = decode_prefix(&f.code, 4);
            let target = insns.iter().find(|i| i.ip() == p.delta).expect("on an instruction boundary");
            assert!(is_emulated(target), "{name}: {:?}", target.code());
            for insn in insns.iter().take_while(|i| i.ip() < p.delta) {
                assert!(
                    matches!(insn.code(), Code::Endbr64 | Code::Test_rm64_r64 | Code::Je_rel8_64 | Code::Je_rel32_64),
                    "{name}: skipped {:?}",
                    insn.code()
                );
            }
        }
    }

    /// glibc 2.36 (Debian 12), the libc the benchmarks were measured on:
    /// free's probe goes to free+9.
    #[test]
    fn glibc_2_36_free_is_moved_to_plus_9() {
        let libc = crate::target::elf::tests::own_libc();
        let f = &crate::target::elf::functions(&libc, &["free"]).unwrap()["free"];
        if !f.code.starts_with(&FREE_2_36[..4]) {
            eprintln!("not glibc 2.36's free: skipped");
            return;
        }
        assert_eq!(entry_probe(&f.code, true).delta, 9);
    }
}
