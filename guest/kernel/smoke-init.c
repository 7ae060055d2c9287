// Smoke-test /init for Accordion's guest kernels (used by `scripts/kernels.sh --smoke`).
// Static aarch64 binary, no libc features beyond syscalls: mounts the basics, prints what the
// kernel offers (CPUs, filesystems, cgroup v2 controllers, vsock) as `SMOKE:` lines, then powers off.
// If the initramfs has /modules/order (one module name a line) and /modules/<name>.ko, it loads them
// first, in that order (the stock Debian kernel's guest/node modules).
// Build: aarch64-linux-gnu-gcc -static -Os -o init smoke-init.c
#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/utsname.h>
#include <unistd.h>

#ifndef AF_VSOCK
#define AF_VSOCK 40
#endif

static void slurp(const char *path, char *buf, size_t len) {
    buf[0] = 0;
    int fd = open(path, O_RDONLY);
    if (fd < 0) return;
    size_t n = 0;
    ssize_t r;
    while (n < len - 1 && (r = read(fd, buf + n, len - 1 - n)) > 0) n += (size_t)r;
    close(fd);
    buf[n] = 0;
    while (n > 0 && buf[n - 1] == '\n') buf[--n] = 0;
}

static void show(const char *label, const char *path) {
    char buf[512];
    slurp(path, buf, sizeof buf);
    printf("SMOKE: %s=%s\n", label, buf[0] ? buf : "?");
}

static void load_modules(void) {
    char order[4096];
    slurp("/modules/order", order, sizeof order);
    int n = 0, bad = 0;
    for (char *name = strtok(order, "\n"); name; name = strtok(NULL, "\n")) {
        char path[256];
        snprintf(path, sizeof path, "/modules/%s.ko", name);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        long rc = fd < 0 ? -1 : syscall(SYS_finit_module, fd, "", 0);
        if (rc != 0) {
            printf("SMOKE: insmod %s FAILED: %m\n", name);
            bad++;
        }
        if (fd >= 0) close(fd);
        n++;
    }
    if (n) printf("SMOKE: insmod %d modules, %d failed\n", n, bad);
}

// Devices bound to a driver: the symlinks in /sys/bus/<bus>/drivers/<drv>/ other than bind/unbind/...
static void bound(const char *label, const char *dir) {
    DIR *d = opendir(dir);
    int n = 0;
    if (d) {
        for (struct dirent *e; (e = readdir(d));)
            if (e->d_type == DT_LNK && strcmp(e->d_name, "module") != 0) n++;
        closedir(d);
    }
    printf("SMOKE: %s_bound=%d\n", label, n);
}

int main(void) {
    mkdir("/dev", 0755);
    mkdir("/proc", 0555);
    mkdir("/sys", 0555);
    mount("devtmpfs", "/dev", "devtmpfs", 0, NULL);
    // The initramfs has no /dev/console node: attach stdio once devtmpfs is there.
    int fd = open("/dev/console", O_RDWR);
    if (fd >= 0) {
        dup2(fd, 0);
        dup2(fd, 1);
        dup2(fd, 2);
        if (fd > 2) close(fd);
    }
    setvbuf(stdout, NULL, _IONBF, 0);
    mount("proc", "/proc", "proc", 0, NULL);
    mount("sysfs", "/sys", "sysfs", 0, NULL);

    struct utsname u;
    uname(&u);
    printf("SMOKE: init reached: %s %s\n", u.release, u.machine);
    load_modules();
    show("cpus_online", "/sys/devices/system/cpu/online");
    show("cpus_possible", "/sys/devices/system/cpu/possible");
    printf("SMOKE: nprocs_onln=%ld\n", sysconf(_SC_NPROCESSORS_ONLN));

    char fs[16384], list[512] = "";
    slurp("/proc/filesystems", fs, sizeof fs - 1);
    strcat(fs, "\n");  // slurp strips the last newline; every entry is "\t<name>\n"
    const char *want[] = {"tmpfs", "devtmpfs", "devpts", "cgroup2", "overlay", "fuse", "virtiofs", NULL};
    for (int i = 0; want[i]; i++) {
        char pat[32];
        snprintf(pat, sizeof pat, "\t%s\n", want[i]);
        strcat(list, strstr(fs, pat) ? " +" : " -");
        strcat(list, want[i]);
    }
    printf("SMOKE: filesystems:%s\n", list);

    mount("cgroup2", "/sys/fs/cgroup", "cgroup2", 0, NULL);
    show("cgroup_controllers", "/sys/fs/cgroup/cgroup.controllers");

    bound("virtio_mmio", "/sys/bus/platform/drivers/virtio-mmio");
    bound("acpi_ged", "/sys/bus/platform/drivers/acpi-ged");

    int s = socket(AF_VSOCK, SOCK_STREAM, 0);
    printf("SMOKE: vsock_socket=%s\n", s >= 0 ? "ok" : "unavailable");
    if (s >= 0) close(s);

    printf("SMOKE: done\n");
    sync();
    reboot(RB_POWER_OFF);
    return 0;
}
