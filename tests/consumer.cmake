# Builds and runs a consumer project of microbatch, the way a user would.
# -DSOURCE=<consumer dir> -DBINARY=<scratch dir> -DMICROBATCH_SOURCE=<repo> -DGENERATOR=... -DCXX=...
# [-DINSTALL_FIRST=ON: install microbatch into <scratch>/prefix and consume it with find_package]
file(REMOVE_RECURSE ${BINARY})
set(consumer_args)
function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE status)
  if(NOT status EQUAL 0)
    message(FATAL_ERROR "failed (${status}): ${ARGN}")
  endif()
endfunction()

if(INSTALL_FIRST)
  run(${CMAKE_COMMAND} -S ${MICROBATCH_SOURCE} -B ${BINARY}/microbatch-build -G ${GENERATOR}
      -DCMAKE_CXX_COMPILER=${CXX} -DMICROBATCH_BUILD_TESTS=OFF -DMICROBATCH_BUILD_EXAMPLES=OFF)
  run(${CMAKE_COMMAND} --install ${BINARY}/microbatch-build --prefix ${BINARY}/prefix)
  list(APPEND consumer_args -DCMAKE_PREFIX_PATH=${BINARY}/prefix)
else()
  list(APPEND consumer_args -DMICROBATCH_SOURCE=${MICROBATCH_SOURCE})
endif()
run(${CMAKE_COMMAND} -S ${SOURCE} -B ${BINARY}/consumer-build -G ${GENERATOR} -DCMAKE_CXX_COMPILER=${CXX}
    ${consumer_args})
run(${CMAKE_COMMAND} --build ${BINARY}/consumer-build)
run(${BINARY}/consumer-build/consumer)
