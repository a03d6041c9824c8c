/*
 * Preloaded ahead of Debian's libfaketime (0.9.10) by `make test-clock`.
 *
 * That libfaketime, told not to fake the monotonic clock (FAKETIME_DONT_FAKE_MONOTONIC=1),
 * still shifts the deadline of clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, ...) by the fake
 * offset and hands the kernel a negative time: EINVAL (upstream libfaketime issue 426, fixed after
 * 0.9.10). Python >= 3.11 implements time.sleep() exactly that way, so every sleep would fail.
 * Sleeps on clocks that are not faked go straight to the kernel here; CLOCK_REALTIME sleeps still
 * go through libfaketime, which converts them correctly.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

typedef int (*clock_nanosleep_fn)(clockid_t, int, const struct timespec *, struct timespec *);

int clock_nanosleep(clockid_t clock_id, int flags, const struct timespec *request, struct timespec *remain) {
    if (clock_id != CLOCK_REALTIME) {
        long result = syscall(SYS_clock_nanosleep, clock_id, flags, request, remain);
        return result == -1 ? errno : 0; /* clock_nanosleep returns the error number itself */
    }
    static clock_nanosleep_fn next;
    if (!next) next = (clock_nanosleep_fn)dlsym(RTLD_NEXT, "clock_nanosleep");
    return next(clock_id, flags, request, remain);
}
