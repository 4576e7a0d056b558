# check_broker_core_includes.cmake - broker_core must not include third-party headers.
#
# Usage: cmake -DDIR=<broker_core folder> [-DSTAMP=<file to touch on success>] -P check_broker_core_includes.cmake
#
# Why a source scan: broker_core's target has no include path for libpq,
# hiredis, libmicrohttpd, jansson, nats or curl, but that alone proves
# nothing.  On Debian jansson.h, microhttpd.h, hiredis/, nats/ and curl/ sit in
# /usr/include, which the compiler searches anyway, and libpq-fe.h is reachable
# as <postgresql/libpq-fe.h>.  Such an #include would compile; only the link
# would fail, and only if a symbol is actually used.  So every .c/.h under the
# folder is read, and any #include of those headers fails the check, with the
# file and line.  Run at build time (before broker_core compiles) and as the
# CTest `broker_core_deps`.
if(NOT DIR)
    message(FATAL_ERROR "check_broker_core_includes: pass -DDIR=<broker_core folder>")
endif()

# One regex per forbidden dependency, matched against the included name.
set(forbidden
    "^(postgresql/)?libpq-fe\\.h$"     # libpq
    "^(postgresql/)?libpq/"            # libpq internals
    "^(postgresql/)?libpq-events\\.h$"
    "^postgresql/"                     # anything else from the server headers
    "^hiredis/"                        # hiredis
    "^hiredis\\.h$"
    "^microhttpd\\.h$"                 # libmicrohttpd
    "^jansson(_config)?\\.h$"          # jansson
    "^nats/"                           # nats.c
    "^nats\\.h$"
    "^curl/"                           # libcurl
)

file(GLOB_RECURSE files "${DIR}/*.c" "${DIR}/*.h")
set(bad "")
foreach(f IN LISTS files)
    # Read the file whole and split it on newlines ourselves: file(STRINGS)
    # drops empty lines and splits on ';', which would skew line numbers.
    # ';', backslash, '[' and ']' have list meaning in CMake, so they are replaced
    # first (none of them can appear in a header name we look for).
    file(READ "${f}" text)
    string(REGEX REPLACE "[][;\\]" " " text "${text}")
    string(REPLACE "\n" ";" lines "${text}")
    set(lineno 0)
    foreach(line IN LISTS lines)
        math(EXPR lineno "${lineno} + 1")
        if(line MATCHES "^[ \t]*#[ \t]*include[ \t]*[<\"]([^>\"]+)[>\"]")
            set(header "${CMAKE_MATCH_1}")
            foreach(re IN LISTS forbidden)
                if(header MATCHES "${re}")
                    file(RELATIVE_PATH rel "${DIR}" "${f}")
                    string(APPEND bad "  ${rel}:${lineno}: #include of ${header}\n")
                    break()
                endif()
            endforeach()
        endif()
    endforeach()
endforeach()

if(bad)
    message(FATAL_ERROR
        "broker_core depends on libc and pthreads only (DESIGN.md, Layout).\n"
        "These includes belong in http_api or sidecar adapters:\n${bad}")
endif()

list(LENGTH files n)
message(STATUS "broker_core_deps: ${n} files scanned, no third-party includes")
if(STAMP)
    file(TOUCH "${STAMP}")
endif()
