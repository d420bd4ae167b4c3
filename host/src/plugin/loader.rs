//! Maps a plugin file into the process: a private copy, `dlopen`, and abi_stable's checks.
//!
//! The other module (beside plugin-api's ABI module) allowed to use `unsafe`. Libraries are never
//! unmapped: abi_stable keeps type layouts that point into them.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use abi_stable::library::{AbiHeaderRef, LibraryError, RootModule};
use plugin_api::abi::{PluginModRef, ROOT_SYMBOL};

use super::LoadError;

/// A plugin library, mapped and checked.
#[derive(Debug)]
pub(crate) struct Mapped {
    /// The root module, valid for the rest of the process.
    pub(crate) module: PluginModRef,
    /// The plugin-api version the plugin was built against.
    pub(crate) api_version: String,
}

static COPIES: AtomicU64 = AtomicU64::new(0);
static MAPPED: AtomicU64 = AtomicU64::new(0);

/// How many libraries this process has mapped (they are never unmapped).
pub(crate) fn mapped_count() -> u64 {
    MAPPED.load(Ordering::Relaxed)
}

/// Checks `file` itself before anything copies or reads it whole: a regular file of at most
/// `max_size` bytes (a sparse 2 GiB file would otherwise be copied and read) that starts with a
/// 64-bit ELF header.
pub(crate) fn check_original(file: &Path, max_size: u64) -> Result<(), LoadError> {
    use std::io::Read as _;
    let io = |source| LoadError::Io {
        file: file.to_owned(),
        source,
    };
    let not = |reason: String| LoadError::NotAPlugin {
        file: file.to_owned(),
        reason,
    };
    let meta = std::fs::metadata(file).map_err(io)?;
    if !meta.is_file() {
        return Err(not("not a regular file".into()));
    }
    if meta.len() > max_size {
        return Err(not(format!(
            "{} bytes, larger than --max-plugin-size ({max_size} bytes); not read",
            meta.len()
        )));
    }
    let mut head = [0u8; 5];
    std::fs::File::open(file)
        .and_then(|mut f| f.read_exact(&mut head))
        .map_err(|_| not("not an ELF file (shorter than an ELF header)".into()))?;
    if &head[..4] != b"\x7fELF" {
        return Err(not("not an ELF file".into()));
    }
    if head[4] != 2 {
        return Err(not("not a 64-bit ELF file".into()));
    }
    Ok(())
}

/// Copies `file` into `private_dir` under a name never used before.
///
/// A private copy gives every load its own path and inode, so glibc never hands back an already
/// mapped library, and a user overwriting `file` later cannot change mapped code.
pub(crate) fn private_copy(file: &Path, private_dir: &Path) -> Result<PathBuf, LoadError> {
    let io = |source| LoadError::Io {
        file: file.to_owned(),
        source,
    };
    let meta = std::fs::metadata(file).map_err(io)?;
    if !meta.is_file() {
        return Err(LoadError::NotAPlugin {
            file: file.to_owned(),
            reason: "not a regular file".into(),
        });
    }
    let stem = file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "plugin".into());
    let n = COPIES.fetch_add(1, Ordering::Relaxed);
    let private_path = private_dir.join(format!("{stem}.{}.{n}.so", std::process::id()));
    std::fs::copy(file, &private_path).map_err(io)?;
    Ok(private_path)
}

/// Checks that `path` (a private copy of `file`) is a complete shared library, so that mapping
/// it cannot kill the process with SIGBUS.
pub(crate) fn check_elf(file: &Path, path: &Path) -> Result<(), LoadError> {
    let data = std::fs::read(path).map_err(|source| LoadError::Io {
        file: file.to_owned(),
        source,
    })?;
    super::elf::check(&data).map_err(|reason| LoadError::NotAPlugin {
        file: file.to_owned(),
        reason,
    })
}

/// Maps `path` (a private copy of `file`, already checked) and runs abi_stable's checks.
pub(crate) fn map(file: &Path, path: &Path) -> Result<Mapped, LoadError> {
    let private_path = path.to_owned();
    let open_flags = libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_LOCAL;
    // SAFETY: loading a library runs its initialisers. The file is a private copy nobody else
    // writes to, checked to be a complete ELF shared library; RTLD_NOW makes a library with
    // unresolved symbols fail here instead of at a later call. Whether the library is a wshost
    // plugin is checked below before any of its functions is called.
    let library = unsafe { libloading::os::unix::Library::open(Some(&private_path), open_flags) }
        .map_err(|e| LoadError::NotAPlugin {
        file: file.to_owned(),
        // dlerror names the private copy; the user knows the file by its own name.
        reason: dlerror_text(&e).replace(&*private_path.to_string_lossy(), &file.to_string_lossy()),
    })?;
    MAPPED.fetch_add(1, Ordering::Relaxed);

    let symbol = format!("{ROOT_SYMBOL}\0");
    // SAFETY: abi_stable exports its root module header under this name as a `static` whose
    // first field is the `AbiHeader`, so the symbol's address is a valid `AbiHeaderRef`
    // (a `#[repr(transparent)]` reference), as in abi_stable's own `abi_header_from_raw_library`.
    // The library is never unloaded (below), so the reference stays valid.
    let header: AbiHeaderRef = match unsafe { library.get::<AbiHeaderRef>(symbol.as_bytes()) } {
        Ok(sym) => *sym,
        Err(_) => {
            std::mem::forget(library);
            return Err(LoadError::NotAPlugin {
                file: file.to_owned(),
                reason: "it exports no plugin root module (was it built with \
                         `plugin_api::export_plugin!`?)"
                    .into(),
            });
        }
    };
    // Never unmap: abi_stable keeps type layouts pointing into the library.
    std::mem::forget(library);

    let lib_header = header.upgrade().map_err(|e| LoadError::Abi {
        file: file.to_owned(),
        reason: library_error_text(&e),
    })?;

    let strings = lib_header.version_strings();
    let api_version = strings.version.as_str().to_owned();
    let theirs = plugin_api::parse_version(&api_version);
    let ours = plugin_api::api_version();
    let name_matches = lib_header.root_mod_consts().name().as_str() == PluginModRef::NAME;
    if !name_matches || !theirs.is_some_and(|t| plugin_api::is_compatible(ours, t)) {
        return Err(LoadError::Incompatible {
            file: file.to_owned(),
            plugin_api: api_version,
        });
    }

    check_layout(lib_header).map_err(|reason| LoadError::Abi {
        file: file.to_owned(),
        reason,
    })?;
    // SAFETY: `check_layout` compared the library's root module layout with this host's
    // `PluginModRef`, down to every vtable, and found them compatible (equal, or one a prefix of
    // the other where abi_stable allows growth). The version was checked above.
    let module = unsafe { lib_header.init_root_module_with_unchecked_layout::<PluginModRef>() }
        .map_err(|e| LoadError::Abi {
            file: file.to_owned(),
            reason: library_error_text(&e),
        })?;
    Ok(Mapped {
        module,
        api_version,
    })
}

fn dlerror_text(e: &libloading::Error) -> String {
    match e {
        libloading::Error::DlOpen { desc } => format!("{desc:?}")
            .trim_start_matches('"')
            .trim_end_matches('"')
            .to_owned(),
        other => other.to_string(),
    }
}

/// Checks the library's root module layout against this host's, in both directions.
///
/// abi_stable's own check (`init_root_module`) treats the loader's layout as the interface and
/// accepts a library whose vtables have *at least* as many fields — a plugin built against the
/// same or a later 1.x — but refuses one built against an earlier 1.x, whose vtables are shorter.
/// Both are sound here: every field after a vtable's `last_prefix_field` is read through an
/// accessor that checks, at run time, whether that vtable has it (a method then runs its default
/// body), so either side may have the longer vtables. What must match is every field both have;
/// abi_stable checks exactly that when the shorter side is the interface.
fn check_layout(lib_header: &abi_stable::library::LibHeader) -> Result<(), String> {
    use abi_stable::abi_stability::abi_checking::check_layout_compatibility;
    let Some(theirs) = lib_header.layout() else {
        return Err("it was exported without a layout to check".into());
    };
    let ours = <PluginModRef as abi_stable::StableAbi>::LAYOUT;
    // The same or a later 1.x: ours is the prefix.
    let Err(same_or_later) = check_layout_compatibility(ours, theirs) else {
        return Ok(());
    };
    // An earlier 1.x: theirs is the prefix.
    match check_layout_compatibility(theirs, ours) {
        Ok(()) => Ok(()),
        Err(_) => Err(error_text(&same_or_later.to_string())),
    }
}

/// abi_stable's errors, readable in one log line: their layout errors run to thousands of lines.
/// Keeps the first line and the first concrete mismatch (`Error:` and what follows), or else the
/// second line.
fn error_text(text: &str) -> String {
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines.next().unwrap_or("");
    let mismatch: Vec<&str> = text
        .lines()
        .map(str::trim)
        .skip_while(|l| !l.starts_with("Error:"))
        .take(5)
        .filter(|l| !l.is_empty())
        .collect();
    match (mismatch.is_empty(), lines.next()) {
        (false, _) => format!("{first} {}", mismatch.join(" ")),
        (true, Some(second)) => format!("{first} {second}"),
        (true, None) => first.to_owned(),
    }
}

fn library_error_text(e: &LibraryError) -> String {
    error_text(&e.to_string())
}
