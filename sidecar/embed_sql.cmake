# embed_sql.cmake - compile sql/migrations/*.sql into outboxd.
#
# Two uses:
#
#   include(embed_sql.cmake)                      (sidecar/CMakeLists.txt)
#   sidecar_embed_migrations(<sql dir> <out.c>)   the build rule for <out.c>
#
#   cmake -DSQL_DIR=<sql/migrations> -DOUT=<migrations_gen.c> -P embed_sql.cmake
#                                                 what that rule runs
#
# The rule regenerates <out.c> whenever a migration is edited, added,
# renamed or removed, or this script changes.  Added: the glob is
# CONFIGURE_DEPENDS, so the build re-runs CMake first.  Renamed or removed:
# no remaining input is newer than <out.c>, and make does not re-run a rule
# only because its list of inputs changed, so the list itself is an input
# too: <out.c>.inputs, rewritten by CMake (only) when the list differs.
# `make clean` removes <out.c>, so a clean build always regenerates it.
#
# The script writes a C file defining
#
#   const sc_migration sc_migrations_embedded[];      by ascending version
#   const size_t       sc_migrations_embedded_count;
#
# (sc_migration: sidecar/src/migrate.h), each file's text as a
# NUL-terminated array of hex bytes, so any quote, backslash, trigraph or
# non-ASCII byte in the SQL is carried over exactly.
#
# The rules a migration folder must keep (the build fails, naming the file,
# when one is broken): every *.sql file is named NNNN_name.sql with NNNN
# four digits and name of [a-z0-9_]; versions run 1, 2, 3, ... with no gap
# and no repeat (outbox.schema_version records the number, so a gap or a
# duplicate would make "the database is at version N" ambiguous); no file
# holds a NUL byte (the text is passed to PostgreSQL as a C string).

if(NOT CMAKE_SCRIPT_MODE_FILE)
    function(sidecar_embed_migrations sql_dir out)
        set(script "${CMAKE_CURRENT_FUNCTION_LIST_FILE}")
        file(GLOB migrations CONFIGURE_DEPENDS "${sql_dir}/*.sql")
        list(SORT migrations)
        string(JOIN "\n" listing ${migrations})
        set(inputs "${out}.inputs")
        set(old "")
        if(EXISTS "${inputs}")
            file(READ "${inputs}" old)
        endif()
        if(NOT old STREQUAL "${listing}\n")
            file(WRITE "${inputs}" "${listing}\n")
        endif()
        add_custom_command(
            OUTPUT "${out}"
            COMMAND ${CMAKE_COMMAND} "-DSQL_DIR=${sql_dir}" "-DOUT=${out}" -P "${script}"
            DEPENDS ${migrations} "${inputs}" "${script}"
            COMMENT "Embedding ${sql_dir} into outboxd"
            VERBATIM)
    endfunction()
    return()
endif()

if(NOT SQL_DIR OR NOT OUT)
    message(FATAL_ERROR "embed_sql.cmake: usage: cmake -DSQL_DIR=<dir> -DOUT=<file.c> -P embed_sql.cmake")
endif()
get_filename_component(SQL_DIR "${SQL_DIR}" ABSOLUTE)
if(NOT IS_DIRECTORY "${SQL_DIR}")
    message(FATAL_ERROR "embed_sql.cmake: ${SQL_DIR} is not a folder")
endif()

file(GLOB files LIST_DIRECTORIES false RELATIVE "${SQL_DIR}" "${SQL_DIR}/*.sql")
list(SORT files)
if(NOT files)
    message(FATAL_ERROR "embed_sql.cmake: no migrations (*.sql) in ${SQL_DIR}")
endif()

# Sixteen bytes (32 hex digits) per line of output.  CMake's regular
# expressions have no {n}, so the pattern is spelled out.
set(pair "[0-9a-f][0-9a-f]")
set(row "")
foreach(i RANGE 1 16)
    string(APPEND row "${pair}")
endforeach()

set(arrays "")
set(table "")
set(expected 1)
foreach(name IN LISTS files)
    if(NOT name MATCHES "^([0-9][0-9][0-9][0-9])_[a-z0-9_]+\\.sql$")
        message(FATAL_ERROR
            "embed_sql.cmake: ${SQL_DIR}/${name}: a migration must be named NNNN_name.sql "
            "(four digits, then lower-case letters, digits and _)")
    endif()
    # "0007" -> 7 (math() would read a leading 0 as decimal anyway, but be plain).
    string(REGEX REPLACE "^0+" "" number "${CMAKE_MATCH_1}")
    if(number STREQUAL "")
        set(number 0)
    endif()
    if(NOT number EQUAL expected)
        if(number LESS expected)
            set(why "repeats or goes back (expected ${expected})")
        else()
            set(why "leaves a gap (expected version ${expected} next)")
        endif()
        message(FATAL_ERROR
            "embed_sql.cmake: ${SQL_DIR}/${name}: version ${number} ${why}; "
            "versions must run 1, 2, 3, ... with no gaps or repeats")
    endif()
    math(EXPR expected "${expected} + 1")

    file(READ "${SQL_DIR}/${name}" hex HEX)
    string(REGEX REPLACE "(${pair})" "\\1 " spaced "${hex}")
    if(spaced MATCHES "(^| )00 ")
        message(FATAL_ERROR "embed_sql.cmake: ${SQL_DIR}/${name} contains a NUL byte")
    endif()
    string(REGEX REPLACE "(${row})" "\\1\n" body "${hex}")
    string(REGEX REPLACE "(${pair})" "0x\\1," body "${body}")
    string(REPLACE "\n" "\n    " body "${body}")
    string(REGEX REPLACE "^(.*)\\.sql$" "\\1" stem "${name}")

    string(APPEND arrays
        "/* ${name} */\n"
        "static const unsigned char sql_${number}[] = {\n"
        "    ${body}0x00\n"
        "};\n\n")
    string(APPEND table "    { ${number}, \"${stem}\", (const char *)sql_${number} },\n")
endforeach()
list(LENGTH files count)

set(text
"/* Generated from sql/migrations by sidecar/embed_sql.cmake: do not edit. */
#include <stddef.h>

#include \"migrate.h\"

extern const sc_migration sc_migrations_embedded[];
extern const size_t sc_migrations_embedded_count;

${arrays}const sc_migration sc_migrations_embedded[] = {
${table}};

const size_t sc_migrations_embedded_count = ${count};
")

# Written only after every file passed the checks above, so a failed run
# leaves no half-written output behind for the next build to trust.
file(WRITE "${OUT}" "${text}")
