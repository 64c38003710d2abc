# Builds and runs a consumer of microbatch, the way a user would. -DMODE= one of
#   add_subdirectory  the consumer project adds the source tree          (-DSOURCE=<consumer project>)
#   find_package      microbatch is installed into <BINARY>/prefix first   (-DSOURCE=<consumer project>)
#   pkg_config        installed likewise; compiled with `pkg-config --cflags --libs microbatch`
#   vendored          only a copy of include/ in the consumer's tree, compiled by hand
# and -DBINARY=<scratch dir> -DMICROBATCH_SOURCE=<repo> -DGENERATOR=... -DCXX=... -DMAIN=<consumer main.cpp>
file(REMOVE_RECURSE ${BINARY})
function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE status)
  if(NOT status EQUAL 0)
    string(REPLACE ";" " " command "${ARGN}")
    message(FATAL_ERROR "failed (${status}): ${command}")
  endif()
endfunction()

if(MODE STREQUAL "find_package" OR MODE STREQUAL "pkg_config")
  run(${CMAKE_COMMAND} -S ${MICROBATCH_SOURCE} -B ${BINARY}/microbatch-build -G ${GENERATOR}
      -DCMAKE_CXX_COMPILER=${CXX} -DMICROBATCH_BUILD_TESTS=OFF -DMICROBATCH_BUILD_EXAMPLES=OFF)
  run(${CMAKE_COMMAND} --install ${BINARY}/microbatch-build --prefix ${BINARY}/prefix)
endif()

if(MODE STREQUAL "add_subdirectory" OR MODE STREQUAL "find_package")
  set(args -DMICROBATCH_SOURCE=${MICROBATCH_SOURCE})
  if(MODE STREQUAL "find_package")
    set(args -DCMAKE_PREFIX_PATH=${BINARY}/prefix)
  endif()
  run(${CMAKE_COMMAND} -S ${SOURCE} -B ${BINARY}/consumer-build -G ${GENERATOR} -DCMAKE_CXX_COMPILER=${CXX} ${args})
  run(${CMAKE_COMMAND} --build ${BINARY}/consumer-build)
  run(${BINARY}/consumer-build/consumer)
elseif(MODE STREQUAL "pkg_config")
  find_program(PKG_CONFIG pkg-config REQUIRED)
  execute_process(COMMAND ${CMAKE_COMMAND} -E env PKG_CONFIG_PATH=${BINARY}/prefix/share/pkgconfig
                          ${PKG_CONFIG} --cflags --libs microbatch
                  OUTPUT_VARIABLE flags OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE status)
  if(NOT status EQUAL 0)
    message(FATAL_ERROR "pkg-config does not find microbatch in ${BINARY}/prefix")
  endif()
  message(STATUS "pkg-config --cflags --libs microbatch: ${flags}")
  separate_arguments(flags UNIX_COMMAND "${flags}")
  run(${CXX} ${flags} ${MAIN} -o ${BINARY}/consumer)
  run(${BINARY}/consumer)
elseif(MODE STREQUAL "vendored")
  file(COPY ${MICROBATCH_SOURCE}/include/microbatch DESTINATION ${BINARY}/app/third_party)
  run(${CXX} -std=c++20 -pthread -I${BINARY}/app/third_party ${MAIN} -o ${BINARY}/consumer)
  run(${BINARY}/consumer)
else()
  message(FATAL_ERROR "unknown MODE ${MODE}")
endif()
