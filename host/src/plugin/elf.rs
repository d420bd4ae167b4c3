//! Checks that a file is a complete shared library for this machine before anything maps it:
//! `dlopen` of a truncated library dies with SIGBUS instead of returning an error.

use object::elf;
use object::read::elf::{ElfFile64, FileHeader as _, ProgramHeader as _, SectionHeader as _};
use object::Endianness;

/// The ELF machine this host runs on.
fn host_machine() -> Option<u16> {
    match std::env::consts::ARCH {
        "x86_64" => Some(elf::EM_X86_64),
        "aarch64" => Some(elf::EM_AARCH64),
        "riscv64" => Some(elf::EM_RISCV),
        _ => None,
    }
}

/// Whether `data` is a whole 64-bit ELF shared library for this machine: every segment and
/// section lies inside the file.
pub(crate) fn check(data: &[u8]) -> Result<(), String> {
    let len = data.len() as u64;
    if len < 4 || &data[..4] != b"\x7fELF" {
        return Err("not an ELF file".into());
    }
    let file = ElfFile64::<Endianness>::parse(data)
        .map_err(|e| format!("not a complete 64-bit ELF file ({e}); truncated or damaged"))?;
    let endian = file.endian();
    let header = file.elf_header();
    if header.e_type(endian) != elf::ET_DYN {
        return Err("not a shared library (ELF type is not DYN)".into());
    }
    if let Some(machine) = host_machine() {
        if header.e_machine(endian) != machine {
            return Err(format!(
                "built for another machine (ELF machine {}), this host is {}",
                header.e_machine(endian),
                std::env::consts::ARCH
            ));
        }
    }
    for ph in file.elf_program_headers() {
        let end = ph.p_offset(endian).saturating_add(ph.p_filesz(endian));
        if end > len {
            return Err(format!(
                "truncated: a segment ends at byte {end}, the file has {len} bytes \
                 (still being copied?)"
            ));
        }
    }
    for sh in file.elf_section_table().iter() {
        if sh.sh_type(endian) == elf::SHT_NOBITS {
            continue;
        }
        let end = sh.sh_offset(endian).saturating_add(sh.sh_size(endian));
        if end > len {
            return Err(format!(
                "truncated: a section ends at byte {end}, the file has {len} bytes \
                 (still being copied?)"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own_library() -> Vec<u8> {
        // Any shared library of this machine will do: take the one the test binary runs with.
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let lib = maps
            .lines()
            .filter_map(|l| l.split_whitespace().nth(5))
            .find(|p| p.contains("libc.so") || p.contains("libgcc_s"))
            .expect("the test process maps a shared library");
        std::fs::read(lib).unwrap()
    }

    #[test]
    fn accepts_a_whole_library() {
        check(&own_library()).unwrap();
    }

    #[test]
    fn refuses_truncated_copies() {
        let lib = own_library();
        for cut in [0, 3, 64, 1000, lib.len() / 2, lib.len() - 1] {
            assert!(check(&lib[..cut]).is_err(), "accepted a copy cut at {cut}");
        }
    }

    #[test]
    fn refuses_non_elf() {
        assert!(check(b"#!/bin/sh\necho not a library\n").is_err());
    }
}
