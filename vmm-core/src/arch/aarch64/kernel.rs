//! The arm64 `Image` boot protocol (Documentation/arch/arm64/booting.rst): header checks,
//! where the kernel, initrd and boot block go in RAM, and loading them.
//!
//! Everything here is checked from the files' sizes and the 64-byte header before any guest
//! memory or KVM object exists, so bad input fails fast with a typed error.

use std::os::unix::fs::FileExt;

use super::layout::{BOOT_BLOCK_SIZE, KERNEL_ALIGN};
use crate::config::InputFile;

/// Size of the arm64 Image header.
pub const HEADER_SIZE: usize = 64;
/// "ARM\x64", little endian, at offset 56.
const MAGIC: u32 = 0x644d_5241;
/// text_offset assumed by kernels older than 3.17 whose image_size is 0.
const LEGACY_TEXT_OFFSET: u64 = 0x8_0000;
/// Where the initrd starts relative to the kernel's end (keeps it out of the kernel's 2 MiB blocks).
const INITRD_ALIGN: u64 = 0x20_0000;

/// Errors about the kernel or initrd files and whether they fit in RAM. Files are named by
/// `InputFile::name`.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The kernel file could not be read.
    #[error("Cannot read kernel {0}")]
    KernelRead(String, #[source] std::io::Error),
    /// The kernel is not an arm64 Image (too short or wrong magic).
    #[error("Kernel {0} is not an arm64 Image (no \"ARM\\x64\" header magic)")]
    NotAnImage(String),
    /// The initrd file could not be read.
    #[error("Cannot read initrd {0}")]
    InitrdRead(String, #[source] std::io::Error),
    /// The kernel (with its BSS) does not fit in RAM below the boot block.
    #[error("Kernel needs {needed} bytes of RAM but only {available} are usable")]
    KernelTooLarge {
        /// Bytes from RAM base to the kernel's end.
        needed: u64,
        /// Bytes of RAM below the boot block.
        available: u64,
    },
    /// The initrd does not fit between the kernel and the boot block.
    #[error("Initrd of {size} bytes does not fit: {available} bytes free after the kernel")]
    InitrdTooLarge {
        /// Initrd size.
        size: u64,
        /// Free bytes between the kernel's end and the boot block.
        available: u64,
    },
    /// Copying the kernel into guest RAM failed.
    #[cfg(target_arch = "aarch64")]
    #[error("Cannot load the kernel into guest RAM")]
    Load(#[source] linux_loader::loader::Error),
    /// Copying the initrd into guest RAM failed.
    #[error("Cannot load the initrd into guest RAM")]
    InitrdLoad(#[source] vm_memory::GuestMemoryError),
}

/// What the Image header tells the loader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageHeader {
    /// Offset from the 2 MiB-aligned base at which the Image must sit.
    pub text_offset: u64,
    /// Bytes the kernel occupies once running, BSS included (0 on pre-3.17 kernels).
    pub image_size: u64,
}

impl ImageHeader {
    /// Parses the first 64 bytes of an Image.
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < HEADER_SIZE {
            return None;
        }
        let field = |at: usize| -> Option<u64> {
            Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
        };
        let magic = u32::from_le_bytes(bytes.get(56..60)?.try_into().ok()?);
        if magic != MAGIC {
            return None;
        }
        let image_size = field(16)?;
        let text_offset = if image_size == 0 {
            LEGACY_TEXT_OFFSET
        } else {
            field(8)?
        };
        Some(Self {
            text_offset,
            image_size,
        })
    }
}

/// A kernel file checked to be an arm64 Image.
#[derive(Debug, Clone)]
pub struct KernelFile {
    /// What messages call it (`InputFile::name`).
    pub name: String,
    /// Its header.
    pub header: ImageHeader,
    /// File size in bytes.
    pub file_size: u64,
}

impl KernelFile {
    /// Opens `kernel` (or borrows it, when already open) and checks its header. Positioned reads
    /// leave an open file's offset alone, so `load_kernel` can read the same file afterwards.
    pub fn inspect(kernel: &InputFile) -> Result<Self, KernelError> {
        let name = kernel.name();
        let read_err = |e| KernelError::KernelRead(name.clone(), e);
        let file = kernel.open().map_err(read_err)?;
        let file_size = file.metadata().map_err(read_err)?.len();
        let head = read_head(&file).map_err(read_err)?;
        let header =
            ImageHeader::parse(&head).ok_or_else(|| KernelError::NotAnImage(name.clone()))?;
        Ok(Self {
            name,
            header,
            file_size,
        })
    }

    /// Bytes the running kernel occupies from its load address: the header's image_size
    /// (which includes BSS) or the file size when that is larger or unknown.
    pub fn footprint(&self) -> u64 {
        self.header.image_size.max(self.file_size)
    }
}

/// Up to `HEADER_SIZE` bytes from the start of `file` (fewer only if the file is shorter).
fn read_head(file: &std::fs::File) -> std::io::Result<Vec<u8>> {
    let mut head = vec![0u8; HEADER_SIZE];
    let mut filled = 0;
    while filled < HEADER_SIZE {
        match file.read_at(&mut head[filled..], filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    head.truncate(filled);
    Ok(head)
}

/// Where everything goes in RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootPlacement {
    /// Guest address of the kernel's first byte (its entry point).
    pub kernel_load: u64,
    /// First byte after the kernel's footprint.
    pub kernel_end: u64,
    /// Initrd guest address and size.
    pub initrd: Option<(u64, u64)>,
    /// Base of the boot block (EFI tables, memory map, DTB, ACPI) at the top of RAM.
    pub boot_block: u64,
}

/// Places the kernel at the RAM base, the initrd above the kernel's footprint, and the boot block
/// in the top `BOOT_BLOCK_SIZE` bytes of RAM.
pub fn place(
    ram_base: u64,
    ram_size: u64,
    kernel: &KernelFile,
    initrd_size: Option<u64>,
) -> Result<BootPlacement, KernelError> {
    debug_assert_eq!(ram_base % KERNEL_ALIGN, 0);
    let usable = ram_size.saturating_sub(BOOT_BLOCK_SIZE);
    let boot_block = ram_base + usable;
    let needed = kernel.header.text_offset.saturating_add(kernel.footprint());
    if usable == 0 || needed > usable {
        return Err(KernelError::KernelTooLarge {
            needed,
            available: usable,
        });
    }
    let kernel_load = ram_base + kernel.header.text_offset;
    let kernel_end = ram_base + needed;
    let initrd = match initrd_size {
        None => None,
        Some(size) => {
            let start = kernel_end.next_multiple_of(INITRD_ALIGN);
            let available = boot_block.saturating_sub(start);
            if size > available {
                return Err(KernelError::InitrdTooLarge { size, available });
            }
            Some((start, size))
        }
    };
    Ok(BootPlacement {
        kernel_load,
        kernel_end,
        initrd,
        boot_block,
    })
}

/// Size of the initrd file.
pub fn initrd_size(initrd: &InputFile) -> Result<u64, KernelError> {
    let size = match initrd {
        InputFile::Path(path) => std::fs::metadata(path),
        InputFile::Open { file, .. } => file.metadata(),
    };
    size.map(|m| m.len())
        .map_err(|e| KernelError::InitrdRead(initrd.name(), e))
}

/// Copies the kernel Image (`file`, which `kernel` describes) into RAM with linux-loader's arm64
/// Image loader. The loader seeks from the start, so an already open file may have been read.
#[cfg(target_arch = "aarch64")]
pub fn load_kernel(
    ram: &crate::memory::GuestRam,
    file: &InputFile,
    kernel: &KernelFile,
    placement: &BootPlacement,
) -> Result<(), KernelError> {
    use linux_loader::loader::{pe::PE, KernelLoader};
    use vm_memory::GuestAddress;

    let opened = file
        .open()
        .map_err(|e| KernelError::KernelRead(kernel.name.clone(), e))?;
    let base = placement.kernel_load - kernel.header.text_offset;
    let result = PE::load(ram.memory(), Some(GuestAddress(base)), &mut &*opened, None)
        .map_err(KernelError::Load)?;
    // The loader derives the address from the same header; a mismatch is a loader bug.
    debug_assert_eq!(result.kernel_load.0, placement.kernel_load);
    Ok(())
}

/// Copies the initrd into RAM at its planned address, from the file's start (an already open
/// file is rewound first).
pub fn load_initrd(
    ram: &crate::memory::GuestRam,
    initrd: &InputFile,
    placement: &BootPlacement,
) -> Result<(), KernelError> {
    use std::io::Seek;
    use vm_memory::{Bytes, GuestAddress};

    let Some((addr, size)) = placement.initrd else {
        return Ok(());
    };
    let read_err = |e| KernelError::InitrdRead(initrd.name(), e);
    let opened = initrd.open().map_err(read_err)?;
    let mut file: &std::fs::File = &opened;
    file.rewind().map_err(read_err)?;
    let len =
        usize::try_from(size).map_err(|_| KernelError::InitrdTooLarge { size, available: 0 })?;
    ram.memory()
        .read_exact_volatile_from(GuestAddress(addr), &mut file, len)
        .map_err(KernelError::InitrdLoad)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::arch::aarch64::layout::RAM_BASE;

    /// A header as 6.12 writes it: text_offset 0, image_size `image_size`.
    pub(crate) fn synthetic_image(image_size: u64, file_size: usize) -> Vec<u8> {
        let mut img = vec![0u8; file_size.max(HEADER_SIZE)];
        img[0..4].copy_from_slice(&0x91005a4d_u32.to_le_bytes()); // "MZ" + add x13, x18, #0x16
        img[8..16].copy_from_slice(&0u64.to_le_bytes());
        img[16..24].copy_from_slice(&image_size.to_le_bytes());
        img[24..32].copy_from_slice(&0xau64.to_le_bytes()); // LE, 4K pages, anywhere
        img[56..60].copy_from_slice(b"ARM\x64");
        img
    }

    fn kernel_file(image_size: u64, file_size: u64) -> KernelFile {
        let header = ImageHeader::parse(&synthetic_image(image_size, 64)).unwrap();
        KernelFile {
            name: "Image".into(),
            header,
            file_size,
        }
    }

    #[test]
    fn test_parse_header_of_6_12_style_image_reads_image_size() {
        let header = ImageHeader::parse(&synthetic_image(0x2a6_0000, 64)).unwrap();
        assert_eq!(
            header,
            ImageHeader {
                text_offset: 0,
                image_size: 0x2a6_0000
            }
        );
    }

    #[test]
    fn test_parse_header_without_magic_is_rejected() {
        let mut img = synthetic_image(0x100_0000, 64);
        img[56] = b'X';
        assert_eq!(ImageHeader::parse(&img), None);
    }

    #[test]
    fn test_parse_header_shorter_than_64_bytes_is_rejected() {
        assert_eq!(
            ImageHeader::parse(&synthetic_image(0x100_0000, 64)[..60]),
            None
        );
    }

    #[test]
    fn test_parse_header_with_zero_image_size_uses_legacy_text_offset() {
        let header = ImageHeader::parse(&synthetic_image(0, 64)).unwrap();
        assert_eq!(header.text_offset, 0x8_0000);
    }

    #[test]
    fn test_place_initrd_above_image_size_not_file_size() {
        // 30 MiB file whose BSS takes it to 33 MiB: the initrd must start above 33 MiB.
        let kernel = kernel_file(33 << 20, 30 << 20);
        let p = place(RAM_BASE, 256 << 20, &kernel, Some(5 << 20)).unwrap();
        assert_eq!(p.kernel_load, RAM_BASE);
        assert_eq!(p.kernel_end, RAM_BASE + (33 << 20));
        assert_eq!(p.initrd, Some((RAM_BASE + (34 << 20), 5 << 20)));
        assert_eq!(p.boot_block, RAM_BASE + (254 << 20));
    }

    #[test]
    fn test_place_initrd_larger_than_memory_is_an_error() {
        let kernel = kernel_file(33 << 20, 30 << 20);
        let err = place(RAM_BASE, 128 << 20, &kernel, Some(200 << 20)).unwrap_err();
        assert!(matches!(
            err,
            KernelError::InitrdTooLarge { size, available } if size == 200 << 20 && available == 92 << 20
        ));
    }

    #[test]
    fn test_place_kernel_larger_than_memory_is_an_error() {
        let kernel = kernel_file(40 << 20, 38 << 20);
        let err = place(RAM_BASE, 32 << 20, &kernel, None).unwrap_err();
        assert!(matches!(err, KernelError::KernelTooLarge { needed, .. } if needed == 40 << 20));
    }

    #[cfg(target_arch = "aarch64")]
    #[test]
    fn test_load_puts_image_at_its_load_address_and_initrd_above_image_size() {
        let dir = std::env::temp_dir().join(format!("accordion-load-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (kernel_path, initrd_path) = (dir.join("Image"), dir.join("initrd"));
        let mut image = synthetic_image(3 << 20, 1 << 20);
        image[0x1000] = 0xab;
        std::fs::write(&kernel_path, &image).unwrap();
        std::fs::write(&initrd_path, b"070701initrd").unwrap();
        // The kernel by path, the initrd already open (as a jailed VMM gets it).
        let kernel_input = InputFile::from(kernel_path.as_path());
        let initrd_input = InputFile::Open {
            file: std::fs::File::open(&initrd_path).unwrap(),
            name: "initrd".into(),
        };
        let kernel = KernelFile::inspect(&kernel_input).unwrap();
        let ram = crate::memory::GuestRam::new(RAM_BASE, 32 << 20).unwrap();
        let initrd_size = initrd_size(&initrd_input).unwrap();
        let placement = place(RAM_BASE, 32 << 20, &kernel, Some(initrd_size)).unwrap();

        load_kernel(&ram, &kernel_input, &kernel, &placement).unwrap();
        load_initrd(&ram, &initrd_input, &placement).unwrap();

        std::fs::remove_dir_all(&dir).unwrap();
        let mut head = [0u8; 64];
        ram.read(RAM_BASE, &mut head).unwrap();
        assert_eq!(&head[56..60], b"ARM\x64");
        let mut byte = [0u8];
        ram.read(RAM_BASE + 0x1000, &mut byte).unwrap();
        assert_eq!(byte[0], 0xab);
        let mut initrd = [0u8; 12];
        ram.read(RAM_BASE + (4 << 20), &mut initrd).unwrap();
        assert_eq!(&initrd, b"070701initrd");
    }

    #[cfg(target_arch = "aarch64")]
    #[test]
    fn test_open_kernel_is_loaded_after_inspection_without_reopening() {
        let path = std::env::temp_dir().join(format!("accordion-open-{}", std::process::id()));
        let mut image = synthetic_image(2 << 20, 1 << 20);
        image[0x2000] = 0xcd;
        std::fs::write(&path, &image).unwrap();
        let input = InputFile::Open {
            file: std::fs::File::open(&path).unwrap(),
            name: "fd 3".into(),
        };
        // Gone from the file system: only the open file can be read.
        std::fs::remove_file(&path).unwrap();
        let kernel = KernelFile::inspect(&input).unwrap();
        let ram = crate::memory::GuestRam::new(RAM_BASE, 32 << 20).unwrap();
        let placement = place(RAM_BASE, 32 << 20, &kernel, None).unwrap();

        load_kernel(&ram, &input, &kernel, &placement).unwrap();

        assert_eq!(kernel.file_size, 1 << 20);
        let mut byte = [0u8];
        ram.read(RAM_BASE + 0x2000, &mut byte).unwrap();
        assert_eq!(byte[0], 0xcd);
    }

    #[test]
    fn test_initrd_already_open_is_read_from_its_start() {
        use std::io::Read;
        let path = std::env::temp_dir().join(format!("accordion-initrd-{}", std::process::id()));
        std::fs::write(&path, b"070701initrd").unwrap();
        let mut file = std::fs::File::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        // Someone read part of it: the offset must not matter.
        file.read_exact(&mut [0u8; 4]).unwrap();
        let input = InputFile::Open {
            file,
            name: "initrd".into(),
        };
        let ram = crate::memory::GuestRam::new(RAM_BASE, 32 << 20).unwrap();
        let placement = BootPlacement {
            kernel_load: RAM_BASE,
            kernel_end: RAM_BASE + (1 << 20),
            initrd: Some((RAM_BASE + (2 << 20), initrd_size(&input).unwrap())),
            boot_block: RAM_BASE + (30 << 20),
        };

        load_initrd(&ram, &input, &placement).unwrap();

        let mut initrd = [0u8; 12];
        ram.read(RAM_BASE + (2 << 20), &mut initrd).unwrap();
        assert_eq!(&initrd, b"070701initrd");
    }

    #[test]
    fn test_inspect_missing_kernel_is_a_read_error() {
        let err = KernelFile::inspect(&"/nonexistent/Image".into()).unwrap_err();
        assert!(matches!(err, KernelError::KernelRead(name, _) if name == "/nonexistent/Image"));
    }

    #[test]
    fn test_inspect_garbage_kernel_is_not_an_image() {
        let dir = std::env::temp_dir().join(format!("accordion-kernel-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("garbage");
        std::fs::write(&path, vec![0x5a; 4096]).unwrap();
        let err = KernelFile::inspect(&path.as_path().into()).unwrap_err();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(err, KernelError::NotAnImage(name) if name == path.display().to_string()));
    }

    #[test]
    fn test_inspect_open_garbage_kernel_names_it() {
        let path = std::env::temp_dir().join(format!("accordion-short-{}", std::process::id()));
        std::fs::write(&path, b"MZ").unwrap();
        let input = InputFile::Open {
            file: std::fs::File::open(&path).unwrap(),
            name: "kernel fd".into(),
        };
        std::fs::remove_file(&path).unwrap();
        let err = KernelFile::inspect(&input).unwrap_err();
        assert!(matches!(err, KernelError::NotAnImage(name) if name == "kernel fd"));
    }
}
